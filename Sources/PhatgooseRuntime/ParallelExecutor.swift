import CPhatgooseSystem
import Dispatch
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Which executor runs a call's parallel phases.
public enum ExecutorKind: String, Sendable, CaseIterable {
    /// Named worker threads pinned to CPUs of their node, spin-then-futex handoff (the default).
    case pinned
    /// Dispatch's global queue (cannot pin; for comparison).
    case dispatch
}

/// Work that every participant of a phase runs its share of. An object rather than a closure, so publishing a phase
/// allocates nothing.
public protocol ParallelJob: AnyObject, Sendable {
    /// Participant `participant`'s share (0 is the calling thread).
    func run(participant: Int)
}

/// Runs one parallel phase at a time on `participantCount` participants: participant 0 is the calling thread, the
/// others are workers. ``run(_:)`` returns when every participant has returned from the job.
///
/// # Thread safety
/// One `run` at a time: the ``Runtime`` serialises calls with its execution lock. `shutdown` may be called from any
/// thread once no `run` is in progress.
public protocol ParallelExecutor: AnyObject, Sendable {
    /// Which executor this is.
    var kind: ExecutorKind { get }
    /// Workers plus the calling thread.
    var participantCount: Int { get }
    /// The node of each participant (participant 0: the node of the CPU the caller last ran on is not known in
    /// advance, so it is reported as node 0 of its topology).
    var participantNodes: [Int] { get }
    /// The CPU each worker is pinned to (nil for the caller and for unpinned workers).
    var participantCPUs: [Int?] { get }
    /// Runs `job` on every participant, the calling thread as participant 0, and returns when all have returned.
    func run(_ job: any ParallelJob)
    /// Stops the workers; no ``run(_:)`` may follow. Calling it again does nothing.
    func shutdown()
}

/// Holds the job of the phase in flight. Written by the caller before it publishes a new generation (sequentially
/// consistent) and read by workers after they observe it; cleared by the caller only after every worker has signalled
/// completion. So no access races, which is why it is `@unchecked Sendable`.
final class PhaseBox: @unchecked Sendable {
    var job: (any ParallelJob)?
}

/// The entry of a thread started with pthread_create. `@unchecked Sendable`: created by the starter and consumed,
/// exactly once, by the new thread.
final class ThreadStart: @unchecked Sendable {
    let body: @Sendable () -> Void
    init(_ body: @escaping @Sendable () -> Void) { self.body = body }
}

/// Starts a joinable thread running `body`.
func startThread(_ body: @escaping @Sendable () -> Void) -> pthread_t {
    var thread = pthread_t()
    let start = Unmanaged.passRetained(ThreadStart(body)).toOpaque()
    let result = pthread_create(&thread, nil, { argument in
        let start = Unmanaged<ThreadStart>.fromOpaque(argument!).takeRetainedValue()
        // Interruptions (SIGINT, SIGTERM, ...) belong to the host's threads, which may be writing files.
        pg_cleanup_block_signals_in_this_thread()
        start.body()
        return nil
    }, start)
    precondition(result == 0, "pthread_create failed: \(result)")
    return thread
}

/// Worker threads pinned to CPUs, woken by a generation counter: they spin on it for `spinNanoseconds` after each
/// phase (so back-to-back calls hand off in well under a microsecond), then sleep on a futex.
///
/// # Thread safety
/// `generation`, `pending`, `sleepers`, `stopping` are atomics; `futexWord` is accessed only through C atomics and
/// the futex calls; `phase` is guarded by the generation protocol (see ``PhaseBox``); `threads` is written in `init`
/// and read in `shutdown`, which runs once (guarded by `stopping`).
public final class PinnedWorkerPool: ParallelExecutor, @unchecked Sendable {
    /// Always ``ExecutorKind/pinned``.
    public let kind = ExecutorKind.pinned
    /// Workers plus the calling thread.
    public let participantCount: Int
    /// The node of each participant; participant 0, the caller, is reported on the topology's first node.
    public let participantNodes: [Int]
    /// The CPU each participant is pinned to; nil for participant 0, the unpinned caller.
    public let participantCPUs: [Int?]
    private let generation = Atomic<UInt64>(0)
    private let pending = Atomic<Int>(0)
    private let sleepers = Atomic<Int>(0)
    private let stopping = Atomic<Bool>(false)
    private let futexWord: UnsafeMutablePointer<UInt32>
    private let phase = PhaseBox()
    private var threads: [pthread_t] = []
    private let spinNanoseconds: UInt64

    /// Starts `workers` threads, placed round-robin over the topology's nodes and pinned to their CPUs.
    public init(topology: Topology, workers: Int, spinMicroseconds: Int = 50) {
        precondition(workers >= 0)
        participantCount = workers + 1
        spinNanoseconds = UInt64(max(0, spinMicroseconds)) * 1000
        futexWord = .allocate(capacity: 1)
        futexWord.initialize(to: 0)
        // The caller is participant 0 on node 0; workers go round-robin over the nodes starting after it, and take
        // their node's CPUs from the last one down, leaving the first CPUs to the (unpinned) caller.
        var nodes = [topology.nodes[0].id]
        var cpus: [Int?] = [nil]
        var perNode = [Int](repeating: 0, count: topology.nodes.count)
        for w in 1...max(workers, 1) where w <= workers {
            let node = topology.nodes[w % topology.nodes.count]
            let cpu = node.cpus[node.cpus.count - 1 - perNode[node.id] % node.cpus.count]
            perNode[node.id] += 1
            nodes.append(node.id)
            cpus.append(cpu)
        }
        participantNodes = nodes
        participantCPUs = cpus
        for participant in 1..<participantCount {
            let name = "pg-n\(nodes[participant])-w\(participant)"
            let cpu = cpus[participant]!
            threads.append(startThread { [self] in self.workerLoop(participant: participant, cpu: cpu, name: name) })
        }
    }

    deinit {
        shutdown()
        futexWord.deallocate()
    }

    private func workerLoop(participant: Int, cpu: Int, name: String) {
        _ = name.withCString { pg_name_current_thread($0) }
        _ = pg_pin_current_thread(Int32(cpu))
        var seen: UInt64 = 0
        while true {
            var spinStart: UInt64 = 0
            var spins = 0
            while generation.load(ordering: .sequentiallyConsistent) == seen {
                if stopping.load(ordering: .sequentiallyConsistent) { return }
                spins += 1
                if spins & 63 != 0 {
                    pg_cpu_relax()
                    continue
                }
                let now = pg_now_ns()
                if spinStart == 0 { spinStart = now }
                if now - spinStart < spinNanoseconds { continue }
                sleepers.add(1, ordering: .sequentiallyConsistent)
                if generation.load(ordering: .sequentiallyConsistent) == seen && !stopping.load(ordering: .sequentiallyConsistent) {
                    _ = pg_futex_wait(futexWord, UInt32(truncatingIfNeeded: seen))
                }
                sleepers.subtract(1, ordering: .sequentiallyConsistent)
            }
            seen = generation.load(ordering: .sequentiallyConsistent)
            if stopping.load(ordering: .sequentiallyConsistent) { return }
            runPhase(participant)
            pending.subtract(1, ordering: .sequentiallyConsistent)
        }
    }

    /// Separate and not inlined, so the worker's reference to the job is released before it signals completion.
    @inline(never)
    private func runPhase(_ participant: Int) {
        phase.job!.run(participant: participant)
    }

    /// Publishes `job` to the workers, runs participant 0's share on the calling thread, then spins (yielding
    /// after a while) until every worker has finished. Traps after ``shutdown()`` when the pool has workers.
    public func run(_ job: any ParallelJob) {
        guard participantCount > 1 else { return job.run(participant: 0) }
        precondition(!stopping.load(ordering: .sequentiallyConsistent), "run after shutdown")
        phase.job = job
        pending.store(participantCount - 1, ordering: .sequentiallyConsistent)
        let next = generation.add(1, ordering: .sequentiallyConsistent).newValue
        pg_atomic_store_u32(futexWord, UInt32(truncatingIfNeeded: next))
        if sleepers.load(ordering: .sequentiallyConsistent) > 0 { _ = pg_futex_wake(futexWord, Int32.max) }
        job.run(participant: 0)
        var spins = 0
        while pending.load(ordering: .sequentiallyConsistent) > 0 {
            spins += 1
            if spins < 1 << 16 { pg_cpu_relax() } else { sched_yield() }
        }
        phase.job = nil
    }

    /// Stops the workers and joins their threads; later calls do nothing. `deinit` calls it too.
    public func shutdown() {
        guard !stopping.exchange(true, ordering: .sequentiallyConsistent) else { return }
        let next = generation.add(1, ordering: .sequentiallyConsistent).newValue
        pg_atomic_store_u32(futexWord, UInt32(truncatingIfNeeded: next))
        _ = pg_futex_wake(futexWord, Int32.max)
        for thread in threads { pthread_join(thread, nil) }
    }
}

/// The same interface on Dispatch's global queue: each phase is `participantCount - 1` async blocks plus the caller,
/// joined with a group. Unpinned; kept so users and benchmarks can compare.
public final class DispatchParallelExecutor: ParallelExecutor, @unchecked Sendable {
    /// Always ``ExecutorKind/dispatch``.
    public let kind = ExecutorKind.dispatch
    /// Blocks per phase plus the calling thread.
    public let participantCount: Int
    /// Nodes assigned round-robin over the topology, for reporting only: Dispatch does not place its threads.
    public let participantNodes: [Int]
    /// All nil: Dispatch's threads are not pinned.
    public let participantCPUs: [Int?]
    private let queue = DispatchQueue.global(qos: .userInitiated)

    /// Creates an executor that runs `workers` blocks per phase besides the caller; it starts no threads.
    public init(topology: Topology, workers: Int) {
        participantCount = workers + 1
        participantNodes = (0..<(workers + 1)).map { topology.nodes[$0 % topology.nodes.count].id }
        participantCPUs = [Int?](repeating: nil, count: workers + 1)
    }

    /// Runs `job` in `participantCount - 1` blocks on the global queue and on the calling thread as
    /// participant 0, and waits for all of them.
    public func run(_ job: any ParallelJob) {
        guard participantCount > 1 else { return job.run(participant: 0) }
        let group = DispatchGroup()
        for participant in 1..<participantCount {
            queue.async(group: group) { job.run(participant: participant) }
        }
        job.run(participant: 0)
        group.wait()
    }

    /// Does nothing: Dispatch owns its threads.
    public func shutdown() {}
}
