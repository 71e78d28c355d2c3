"""config/subids.py: /etc/subuid lines."""

from nodestepd.config.subids import SubidRange, parse_subids


def test_subuid_lines():
    text = ("alice:100000:65536\n# a comment\n\n1234:200000:10\nbad line\nbob:x:1\ncarol:5:0\n"
            "dave:4294967290:10\n  erin:300000:5  \n")
    assert parse_subids(text) == [SubidRange("alice", 100000, 65536), SubidRange("1234", 200000, 10),
                                  SubidRange("erin", 300000, 5)]
