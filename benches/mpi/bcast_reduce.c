/* The peer of `weightstream bench fabric`: MPI_Bcast and MPI_Reduce (fp32
 * sum) of the same byte counts between the same number of processes. Rank 0
 * plays the store; ranks 1..N the workers. Each repeat is timed from a
 * barrier to a barrier after the collective; the median is printed as one
 * JSON line.
 *
 *   mpicc -O2 -o bcast_reduce bcast_reduce.c
 *   mpirun --allow-run-as-root --oversubscribe -np $((N+1)) \
 *       --mca btl tcp,self --mca btl_tcp_if_include lo ./bcast_reduce BYTES REPEATS
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, n, sizeof(double), cmp);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    long bytes = argc > 1 ? atol(argv[1]) : 256L << 20;
    int repeats = argc > 2 ? atoi(argv[2]) : 5;
    long n = bytes / 4;
    float *buf = malloc(n * sizeof(float)), *out = malloc(n * sizeof(float));
    double *bc = malloc(repeats * sizeof(double)), *rd = malloc(repeats * sizeof(double));
    memset(buf, 0, n * sizeof(float));
    for (int r = 0; r < repeats; r++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        MPI_Bcast(buf, (int)n, MPI_FLOAT, 0, MPI_COMM_WORLD);
        MPI_Barrier(MPI_COMM_WORLD);
        double t1 = MPI_Wtime();
        MPI_Reduce(buf, out, (int)n, MPI_FLOAT, MPI_SUM, 0, MPI_COMM_WORLD);
        MPI_Barrier(MPI_COMM_WORLD);
        double t2 = MPI_Wtime();
        bc[r] = (double)bytes / (t1 - t0);
        rd[r] = (double)bytes / (t2 - t1);
    }
    if (rank == 0) {
        printf("{\"bench\": \"mpi\", \"workers\": %d, \"bytes\": %ld, \"repeats\": %d, "
               "\"broadcast_bytes_per_s\": %.0f, \"reduce_bytes_per_s\": %.0f}\n",
               size - 1, bytes, repeats, median(bc, repeats), median(rd, repeats));
    }
    free(buf); free(out); free(bc); free(rd);
    MPI_Finalize();
    return 0;
}
