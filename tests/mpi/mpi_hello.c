/*
 * mpi_hello: the MPI test program of the MPI tests (tests/e2e/test_mpi.py), built against
 * Open MPI and MPICH by scripts/make-mpi-bundle.sh.
 *
 *   mpi_hello [--exit-rank R --exit-code C]
 *
 * Each rank prints "rank R of N on HOST uid U", then the ranks sum their ranks with
 * MPI_Allreduce and rank 0 prints "sum S expected E ok" (or "... WRONG" and exit 1).
 * With --exit-rank R, rank R exits with code C right after the allreduce, without
 * MPI_Finalize (as a failing rank would); the others then finalize, or are ended by the
 * launcher.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	int exit_rank = -1, exit_code = 0;
	for (int i = 1; i + 1 < argc; i += 2) {
		if (strcmp(argv[i], "--exit-rank") == 0)
			exit_rank = atoi(argv[i + 1]);
		else if (strcmp(argv[i], "--exit-code") == 0)
			exit_code = atoi(argv[i + 1]);
		else {
			fprintf(stderr, "usage: mpi_hello [--exit-rank R --exit-code C]\n");
			return 2;
		}
	}
	MPI_Init(&argc, &argv);
	int rank, size;
	MPI_Comm_rank(MPI_COMM_WORLD, &rank);
	MPI_Comm_size(MPI_COMM_WORLD, &size);
	char host[256] = "";
	gethostname(host, sizeof host - 1);
	printf("rank %d of %d on %s uid %d\n", rank, size, host, (int)getuid());
	fflush(stdout);
	long mine = rank, sum = 0;
	MPI_Allreduce(&mine, &sum, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
	long expected = (long)size * (size - 1) / 2;
	if (rank == 0) {
		printf("sum %ld expected %ld %s\n", sum, expected, sum == expected ? "ok" : "WRONG");
		fflush(stdout);
	}
	if (rank == exit_rank)
		_exit(exit_code);
	MPI_Finalize();
	return sum == expected ? 0 : 1;
}
