#if canImport(CMPI)
import CMPI
#endif
import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A failure of the distributed runtime.
public struct DistributedError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure this is; extensible without breaking users.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// The code's name, as printed in messages.
        public let name: String
        /// Creates a code with the given name.
        public init(_ name: String) { self.name = name }
        /// The code's name.
        public var description: String { name }

        /// This build has no MPI (OpenMPI was not found when it was built).
        public static let unavailable = Code("unavailable")
        /// An MPI call failed.
        public static let mpi = Code("mpi")
        /// A rank did not answer within the timeout: it died or hangs.
        public static let timeout = Code("timeout")
        /// A rank reported a failure of its own (it could not load the library, its library differs, its share
        /// exceeds the memory cap).
        public static let rank = Code("rank")
        /// An option is out of range.
        public static let option = Code("option")
        /// A share of the library exceeds the memory cap.
        public static let memoryCap = Code("memory-cap")
        /// A buffer or message has the wrong size, or a module does not exist.
        public static let shape = Code("shape")
        /// The runtime was stopped, or failed earlier and serves no more calls.
        public static let stopped = Code("stopped")
    }

    /// What kind of failure this is.
    public let code: Code
    /// One line naming what failed, what was expected and what was found.
    public let message: String

    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// The message.
    public var description: String { message }
}

/// This process's place in the MPI world (`MPI_COMM_WORLD`): its rank and the number of ranks. Messages are bytes;
/// every wait polls with a deadline, so a rank that died or hangs becomes an error, never a hang.
///
/// MPI is initialised once per process (thread level `MPI_THREAD_SERIALIZED`: the distributed runtime makes one
/// MPI call at a time, from whichever thread holds its lock) and finalised by ``finalize()``.
///
/// # Thread safety
/// `rank` and `size` are immutable; the messaging methods must not run on two threads at once (the callers hold a
/// lock around them).
public final class MPIWorld: @unchecked Sendable {
    /// True when this build has MPI.
    public static var isAvailable: Bool {
        #if canImport(CMPI)
        return true
        #else
        return false
        #endif
    }

    /// True when this process was started by `mpirun` (or another MPI launcher): its environment names a world rank.
    public static var launchedByMPI: Bool {
        let environment = ProcessInfo.processInfo.environment
        return ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"].contains { environment[$0] != nil }
    }

    /// This process's rank, 0 to `size - 1`.
    public let rank: Int
    /// The number of ranks.
    public let size: Int

    private static let shared = Mutex<MPIWorld?>(nil)
    /// Set once rank 0 has told the serving ranks to stop: they are gone, nothing more is sent to them.
    let stopped = Atomic<Bool>(false)
    private let brokenFlag = Atomic<Bool>(false)

    /// True once a rank failed to answer in time or an MPI call failed: the world cannot end in order (a stuck rank
    /// would hold up `MPI_Finalize` for ever), so the only way out is ``abort(code:)``.
    public var isBroken: Bool { brokenFlag.load(ordering: .acquiring) }

    func markBroken() { brokenFlag.store(true, ordering: .releasing) }

    private init(rank: Int, size: Int) {
        self.rank = rank
        self.size = size
    }

    /// The world, initialising MPI on first use. Throws `.unavailable` in a build without MPI, `.mpi` when
    /// initialisation fails.
    public static func initialize() throws(DistributedError) -> MPIWorld {
        #if canImport(CMPI)
        let result: Result<MPIWorld, DistributedError> = shared.withLock { world in
            if let world { return .success(world) }
            var provided: Int32 = 0
            let rc = pg_mpi_init(&provided)
            guard rc == MPI_SUCCESS else { return .failure(DistributedError(.mpi, "MPI_Init_thread: \(errorText(rc))")) }
            guard provided >= pg_mpi_thread_serialized() else {
                return .failure(DistributedError(.mpi, "MPI_Init_thread: expected thread level MPI_THREAD_SERIALIZED or higher, found level \(provided)"))
            }
            let made = MPIWorld(rank: Int(pg_mpi_rank()), size: Int(pg_mpi_size()))
            world = made
            return .success(made)
        }
        return try result.get()
        #else
        throw DistributedError(.unavailable, "MPI: this build of Phatgoose has no MPI (OpenMPI's pkg-config file ompi.pc was not found when it was built); install libopenmpi-dev and openmpi-bin and rebuild")
        #endif
    }

    /// Ends MPI for this process (idempotent). No messaging afterwards.
    public func finalize() {
        #if canImport(CMPI)
        _ = pg_mpi_finalize()
        #endif
    }

    /// Ends every rank of the world at once (after an error that leaves ranks waiting for messages that will not
    /// come); does not return.
    public func abort(code: Int32) -> Never {
        #if canImport(CMPI)
        pg_mpi_abort(code)
        #endif
        Glibc.exit(code)
    }

    #if canImport(CMPI)
    static func errorText(_ code: Int32) -> String {
        let capacity = Int(pg_mpi_max_error_string()) + 1
        var text = [CChar](repeating: 0, count: capacity)
        pg_mpi_error_string(code, &text, Int32(capacity))
        let message = String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return message.isEmpty ? "MPI error \(code)" : "\(message) (MPI error \(code))"
    }
    #endif
}

/// A pending send or receive.
final class PendingMessage {
    #if canImport(CMPI)
    var request: MPI_Request? = pg_mpi_request_null()
    #endif
    /// The peer rank.
    var peer = 0
    /// Bytes received, once done (receives).
    var received = 0
    var done = true
}

/// Wait strategy for polls: spin a little, then yield the CPU, then sleep in growing steps (ranks share cores with
/// each other and with the host's threads, so a waiting rank must not keep a core from the rank it waits for).
struct Backoff {
    private var polls = 0
    private var sleepNanos = 0

    mutating func reset() {
        polls = 0
        sleepNanos = 0
    }

    /// Waits a little, more the longer the wait has been going on.
    mutating func pause() {
        polls += 1
        if polls < 64 { return }
        if polls < 2048 {
            sched_yield()
            return
        }
        sleepNanos = min(max(sleepNanos * 2, 10_000), 500_000)
        var request = timespec(tv_sec: 0, tv_nsec: sleepNanos)
        _ = nanosleep(&request, nil)
    }
}

extension MPIWorld {
    /// Monotonic nanoseconds.
    static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// Starts sending `bytes` bytes at `buffer` to `peer` (the buffer must stay unchanged until the send is done).
    func send(_ buffer: UnsafeRawPointer, bytes: Int, to peer: Int, tag: Int32, into pending: PendingMessage) throws(DistributedError) {
        #if canImport(CMPI)
        guard bytes <= Int(pg_mpi_max_count()) else {
            throw DistributedError(.shape, "MPI message to rank \(peer): expected at most \(pg_mpi_max_count()) bytes, found \(bytes)")
        }
        pending.peer = peer
        pending.done = false
        let rc = pg_mpi_isend(buffer, Int32(bytes), Int32(peer), tag, &pending.request)
        guard rc == MPI_SUCCESS else {
            pending.done = true
            throw DistributedError(.mpi, "MPI_Isend to rank \(peer): \(Self.errorText(rc))")
        }
        #else
        throw DistributedError(.unavailable, "MPI: unavailable in this build")
        #endif
    }

    /// Starts receiving at most `capacity` bytes from `peer` into `buffer`.
    func receive(_ buffer: UnsafeMutableRawPointer, capacity: Int, from peer: Int, tag: Int32, into pending: PendingMessage) throws(DistributedError) {
        #if canImport(CMPI)
        pending.peer = peer
        pending.done = false
        pending.received = 0
        let rc = pg_mpi_irecv(buffer, Int32(min(capacity, Int(pg_mpi_max_count()))), Int32(peer), tag, &pending.request)
        guard rc == MPI_SUCCESS else {
            pending.done = true
            throw DistributedError(.mpi, "MPI_Irecv from rank \(peer): \(Self.errorText(rc))")
        }
        #else
        throw DistributedError(.unavailable, "MPI: unavailable in this build")
        #endif
    }

    /// Polls `pending` once; true when done.
    func test(_ pending: PendingMessage) throws(DistributedError) -> Bool {
        #if canImport(CMPI)
        if pending.done { return true }
        var flag: Int32 = 0, bytes: Int32 = 0
        let rc = pg_mpi_test(&pending.request, &flag, &bytes, nil, nil)
        guard rc == MPI_SUCCESS else {
            pending.done = true
            markBroken()
            throw DistributedError(.mpi, "MPI_Test on a message with rank \(pending.peer): \(Self.errorText(rc))")
        }
        if flag != 0 {
            pending.done = true
            pending.received = Int(bytes)
        }
        return pending.done
        #else
        return true
        #endif
    }

    /// Waits until every message in `pending` is done, or throws `.timeout` naming the first rank still pending
    /// once `timeoutNanos` have passed. `context` describes the exchange for the message.
    func wait(_ pending: [PendingMessage], timeoutNanos: UInt64, context: () -> String) throws(DistributedError) {
        let start = Self.now()
        var backoff = Backoff()
        while true {
            var all = true
            for message in pending where !message.done {
                if try !test(message) { all = false }
            }
            if all { return }
            if Self.now() - start > timeoutNanos {
                markBroken()
                let late = pending.first { !$0.done }!.peer
                throw DistributedError(.timeout, "rank \(late) did not answer within \(Double(timeoutNanos) / 1e9) s (\(context())): it died, hangs or is too slow; the distributed runtime serves no more calls")
            }
            backoff.pause()
        }
    }

    /// A message from `peer` with `tag` that has arrived and not been received: its size in bytes, or nil.
    func probe(from peer: Int, tag: Int32) throws(DistributedError) -> Int? {
        #if canImport(CMPI)
        var flag: Int32 = 0, bytes: Int32 = 0
        let rc = pg_mpi_iprobe(Int32(peer), tag, &flag, &bytes)
        guard rc == MPI_SUCCESS else { throw DistributedError(.mpi, "MPI_Iprobe for rank \(peer): \(Self.errorText(rc))") }
        return flag != 0 ? Int(bytes) : nil
        #else
        return nil
        #endif
    }

    /// Abandons the pending messages (after a timeout, or at shut-down).
    func cancel(_ pending: [PendingMessage]) {
        #if canImport(CMPI)
        for message in pending where !message.done {
            pg_mpi_cancel(&message.request)
            message.done = true
        }
        #endif
    }
}
