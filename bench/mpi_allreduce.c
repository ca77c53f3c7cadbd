/* OpenMPI MPI_Allreduce bandwidth, same sizes, iteration counts and definitions as
 * `scaletrain bench comm` (algbw = bytes / time, busbw = algbw * 2(n-1)/n, time = slowest rank).
 *
 *   mpicc -O2 -o target/mpi_allreduce bench/mpi_allreduce.c
 *   mpirun --allow-run-as-root -n 2 target/mpi_allreduce 1K..256M 4      # prints one JSON document
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static size_t parse_size(const char *s) {
    char *end;
    size_t v = strtoull(s, &end, 10);
    switch (*end) {
    case 'K': case 'k': return v << 10;
    case 'M': case 'm': return v << 20;
    case 'G': case 'g': return v << 30;
    default: return v;
    }
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, n;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    const char *spec = argc > 1 ? argv[1] : "1K..256M";
    size_t factor = argc > 2 ? strtoull(argv[2], NULL, 10) : 4;
    const char *dots = strstr(spec, "..");
    size_t lo = parse_size(spec), hi = dots ? parse_size(dots + 2) : lo;
    if (rank == 0) printf("{\"results\": [");
    int first = 1;
    for (size_t bytes = lo; bytes <= hi; bytes *= factor) {
        size_t count = bytes / 4;
        float *buf = malloc(count * sizeof(float) + 4);
        for (size_t i = 0; i < count; i++) buf[i] = (float)(rank + 1);
        size_t iters = (512ull << 20) / bytes;
        if (iters < 5) iters = 5;
        if (iters > 2000) iters = 2000;
        for (int w = 0; w < 2; w++) MPI_Allreduce(MPI_IN_PLACE, buf, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        for (size_t i = 0; i < iters; i++) MPI_Allreduce(MPI_IN_PLACE, buf, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        double t = (MPI_Wtime() - t0) / iters, tmax;
        MPI_Allreduce(&t, &tmax, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        if (rank == 0) {
            double algbw = bytes / tmax / 1e9;
            printf("%s\n  {\"bytes\": %zu, \"algo\": \"mpi\", \"transport\": \"openmpi\", \"nproc\": %d, \"latency_us\": %.3f, \"algbw_gbps\": %.6f, \"busbw_gbps\": %.6f}",
                   first ? "" : ",", bytes, n, tmax * 1e6, algbw, algbw * 2.0 * (n - 1) / n);
            first = 0;
        }
        free(buf);
        if (!dots) break;
    }
    if (rank == 0) printf("\n]}\n");
    MPI_Finalize();
    return 0;
}
