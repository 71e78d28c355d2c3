"""nodestepd, the daemon: its command line and start-up (main.py), the service systemd sees
(service.py), the server's lifecycle (server.py), one session per connection answering
requests (session.py) through admission, the registry of steps and the configuration in
force."""
