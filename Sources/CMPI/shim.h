// OpenMPI's C API as Swift sees it: MPI_COMM_WORLD, MPI_BYTE and MPI_REQUEST_NULL are macros over OpenMPI's
// globals that Swift cannot import, so the calls the distributed runtime makes are wrapped here, on
// MPI_COMM_WORLD and bytes only.
#ifndef PHATGOOSE_CMPI_SHIM_H
#define PHATGOOSE_CMPI_SHIM_H
#include <mpi.h>
#include <limits.h>

/// Initialises MPI (if not yet) asking for MPI_THREAD_SERIALIZED, errors returned instead of aborting.
/// Returns an MPI error code; `provided` receives the thread level.
static inline int pg_mpi_init(int *provided) {
    int done = 0;
    MPI_Initialized(&done);
    int rc = MPI_SUCCESS;
    if (done) {
        MPI_Query_thread(provided);
    } else {
        rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_SERIALIZED, provided);
    }
    if (rc == MPI_SUCCESS) MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    return rc;
}
static inline int pg_mpi_thread_serialized(void) { return MPI_THREAD_SERIALIZED; }
static inline int pg_mpi_rank(void) { int r = 0; MPI_Comm_rank(MPI_COMM_WORLD, &r); return r; }
static inline int pg_mpi_size(void) { int s = 1; MPI_Comm_size(MPI_COMM_WORLD, &s); return s; }
static inline int pg_mpi_finalize(void) {
    int done = 0;
    MPI_Finalized(&done);
    return done ? MPI_SUCCESS : MPI_Finalize();
}
static inline void pg_mpi_abort(int code) { MPI_Abort(MPI_COMM_WORLD, code); }
static inline MPI_Request pg_mpi_request_null(void) { return MPI_REQUEST_NULL; }
static inline int pg_mpi_isend(const void *buffer, int bytes, int dest, int tag, MPI_Request *request) {
    return MPI_Isend(buffer, bytes, MPI_BYTE, dest, tag, MPI_COMM_WORLD, request);
}
static inline int pg_mpi_irecv(void *buffer, int bytes, int source, int tag, MPI_Request *request) {
    return MPI_Irecv(buffer, bytes, MPI_BYTE, source, tag, MPI_COMM_WORLD, request);
}
/// Tests `request`; when it completed, `done` is 1 and `bytes`, `source` and `tag` describe the message received.
static inline int pg_mpi_test(MPI_Request *request, int *done, int *bytes, int *source, int *tag) {
    MPI_Status status;
    int rc = MPI_Test(request, done, &status);
    if (rc == MPI_SUCCESS && *done) {
        if (bytes) MPI_Get_count(&status, MPI_BYTE, bytes);
        if (source) *source = status.MPI_SOURCE;
        if (tag) *tag = status.MPI_TAG;
    }
    return rc;
}
/// Cancels and frees a pending request (a receive nobody will match, at shut-down or after a timeout).
static inline void pg_mpi_cancel(MPI_Request *request) {
    if (*request == MPI_REQUEST_NULL) return;
    MPI_Cancel(request);
    MPI_Request_free(request);
}
/// Whether a message from `source` with `tag` has arrived; if so `bytes` is its size.
static inline int pg_mpi_iprobe(int source, int tag, int *flag, int *bytes) {
    MPI_Status status;
    int rc = MPI_Iprobe(source, tag, MPI_COMM_WORLD, flag, &status);
    if (rc == MPI_SUCCESS && *flag && bytes) MPI_Get_count(&status, MPI_BYTE, bytes);
    return rc;
}
static inline int pg_mpi_any_source(void) { return MPI_ANY_SOURCE; }
static inline int pg_mpi_any_tag(void) { return MPI_ANY_TAG; }
static inline int pg_mpi_max_count(void) { return INT_MAX; }
/// The text of an MPI error code.
static inline void pg_mpi_error_string(int code, char *text, int capacity) {
    int length = 0;
    if (capacity <= 0) return;
    if (capacity < MPI_MAX_ERROR_STRING || MPI_Error_string(code, text, &length) != MPI_SUCCESS) {
        text[0] = 0;
        return;
    }
    text[length < capacity ? length : capacity - 1] = 0;
}
static inline int pg_mpi_max_error_string(void) { return MPI_MAX_ERROR_STRING; }
#endif
