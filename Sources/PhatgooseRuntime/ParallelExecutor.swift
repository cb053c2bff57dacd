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
    /// True while the workers' CPUs are contended (a worker was recently preempted): small phases then do better on
    /// the caller alone, as a preempted worker holding a task makes the caller wait for the scheduler to run it again.
    var prefersCallerAlone: Bool { get }
}

extension ParallelExecutor {
    /// Never: only the pinned pool watches for preemption.
    public var prefersCallerAlone: Bool { false }
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

/// Worker threads pinned to CPUs, woken by a generation counter. A phase is open to workers from its publication
/// until the caller has run out of work; a worker that was not running in that window (preempted, or asleep and not
/// yet scheduled) skips the phase, so the caller never waits for a worker that does not run. Jobs must therefore let
/// participant 0 do all of the work (every task claimable by anyone); the workers are help, not owners.
///
/// Spinning adapts: each worker spins after a phase for a budget that doubles when the next phase came within it and
/// halves when it did not (up to `spinNanoseconds`), and it stops spinning at once and shrinks the budget when it sees
/// it was preempted while spinning (the machine is oversubscribed). The caller spins on workers still in a phase only
/// for the same bound, then sleeps on a futex until the last one leaves.
///
/// Contention: a worker that finds it was preempted (a phase that took longer than 40 us during which its count of
/// involuntary context switches grew, or a spin cut short as above) marks the pool contended for a window, and
/// ``prefersCallerAlone`` is true until the window ends. The window starts at 20 ms and doubles, up to 640 ms, each
/// time contention is seen again within four windows of the last sighting; otherwise it starts over. When it ends,
/// the first caller to ask checks whether the machine is still oversubscribed (more runnable threads than CPUs once
/// the sleeping workers would run too; not asked when this process may use only some of the CPUs) and, if so, opens
/// it again for another window without sending work to find out. The scheduler keeps small dispatches on the caller
/// meanwhile, so a busy neighbour costs them little, and large ones, which still gain from a second core at a share
/// of its speed, keep their workers (and so keep the sightings coming).
///
/// # Thread safety
/// `generation`, `door`, `sleepers`, `callerSleeping`, `stopping` are atomics; `futexWord` and `doneWord` are
/// accessed only through C atomics and the futex calls; `phase` is guarded by the door protocol (see ``PhaseBox``);
/// `threads` is written in `init` and read in `shutdown`, which runs once (guarded by `stopping`).
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
    /// The phase's door: generation (high 32 bits), open (bit 31), workers inside (low 31 bits).
    private let door = Atomic<UInt64>(0)
    private let sleepers = Atomic<Int>(0)
    private let callerSleeping = Atomic<Bool>(false)
    private let stopping = Atomic<Bool>(false)
    private let futexWord: UnsafeMutablePointer<UInt32>
    /// The generation of the last phase whose workers have all left, for the caller's futex.
    private let doneWord: UnsafeMutablePointer<UInt32>
    private let phase = PhaseBox()
    private var threads: [pthread_t] = []
    private let spinNanoseconds: UInt64
    /// Phases workers joined and phases they skipped (the door closed before they came), for tests and reports.
    private let joinedCount = Atomic<Int>(0)
    private let skippedCount = Atomic<Int>(0)
    /// Times a spinning worker saw it had been preempted and went to sleep.
    private let preemptedCount = Atomic<Int>(0)
    /// Contention (see the type's documentation): sightings, the last one's time, the window, and its end.
    private let contentionCount = Atomic<Int>(0)
    private let lastContention = Atomic<UInt64>(0)
    private let contentionWindow = Atomic<UInt64>(PinnedWorkerPool.firstContentionWindow)
    private let callerAloneUntil = Atomic<UInt64>(0)
    static let firstContentionWindow: UInt64 = 20_000_000
    static let longestContentionWindow: UInt64 = 640_000_000
    /// Stands in for ``oversubscribed()`` when given (tests).
    private let oversubscribedOverride: (@Sendable () -> Bool)?
    /// This process may use fewer CPUs than the machine has online.
    private let restricted: Bool
    private let onlineCPUs: Int

    private static let openBit: UInt64 = 1 << 31
    private static let insideMask: UInt64 = (1 << 31) - 1

    /// Starts `workers` threads, placed round-robin over the topology's nodes and pinned to their CPUs.
    /// `oversubscribed` (by default: the machine's runnable threads, the caller and spinning workers included, plus
    /// the sleeping workers exceed its online CPUs) is asked when a contention window ends.
    public init(topology: Topology, workers: Int, spinMicroseconds: Int = 50, oversubscribed: (@Sendable () -> Bool)? = nil) {
        precondition(workers >= 0)
        self.oversubscribedOverride = oversubscribed
        let online = max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
        onlineCPUs = online
        restricted = Topology.allowedCPUs().count != online
        participantCount = workers + 1
        spinNanoseconds = UInt64(max(0, spinMicroseconds)) * 1000
        futexWord = .allocate(capacity: 1)
        futexWord.initialize(to: 0)
        doneWord = .allocate(capacity: 1)
        doneWord.initialize(to: 0)
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
        doneWord.deallocate()
    }

    /// Phases the workers joined, phases they found closed, and spins cut short by preemption, since start.
    public var handoffCounts: (joined: Int, skipped: Int, preempted: Int) {
        (joinedCount.load(ordering: .relaxed), skippedCount.load(ordering: .relaxed), preemptedCount.load(ordering: .relaxed))
    }

    /// Times a worker saw it had been preempted (in a phase or while spinning), since start.
    public var contentionSightings: Int { contentionCount.load(ordering: .relaxed) }

    /// When the open contention window ends (monotonic nanoseconds), or 0 when none is open; for tests.
    var contentionWindowEnd: UInt64 { callerAloneUntil.load(ordering: .relaxed) }

    /// True until the contention window of the last sighting ends.
    public var prefersCallerAlone: Bool {
        let until = callerAloneUntil.load(ordering: .relaxed)
        guard until != 0 else { return false }
        let now = pg_now_ns()
        if now < until { return true }
        // The window is over: one caller looks at the machine instead of probing with work.
        guard callerAloneUntil.compareExchange(expected: until, desired: 0, ordering: .relaxed).exchanged else {
            return callerAloneUntil.load(ordering: .relaxed) != 0
        }
        guard oversubscribed() else { return false }
        callerAloneUntil.store(now + contentionWindow.load(ordering: .relaxed), ordering: .relaxed)
        return true
    }

    /// Whether the machine is oversubscribed now (asked when a contention window ends). /proc/loadavg counts the
    /// machine's runnable threads, the asking caller and any worker still spinning included; the sleeping workers
    /// would run too. Restricted to fewer CPUs than the machine has (taskset, a cpuset), the count says nothing about
    /// ours: the window then closes and the next phase probes.
    private func oversubscribed() -> Bool {
        if let oversubscribedOverride { return oversubscribedOverride() }
        guard !restricted else { return false }
        let running = Int(pg_runnable_threads())
        return running >= 0 && running + sleepers.load(ordering: .relaxed) > onlineCPUs
    }

    /// Records a sighting of contention at `now` and opens (or extends) the window; returns the window. Called by
    /// the workers; tests call it to stand in for a busy neighbour.
    @discardableResult
    func noteContention(now: UInt64 = pg_now_ns()) -> UInt64 {
        contentionCount.add(1, ordering: .relaxed)
        let last = lastContention.exchange(now, ordering: .relaxed)
        var window = contentionWindow.load(ordering: .relaxed)
        // Another worker's sighting may carry an earlier time than the last one recorded: that is recent too.
        if last != 0 && (now < last || now - last < 4 * window) {
            window = min(window * 2, Self.longestContentionWindow)
        } else {
            window = Self.firstContentionWindow
        }
        contentionWindow.store(window, ordering: .relaxed)
        callerAloneUntil.store(now + window, ordering: .relaxed)
        return window
    }

    private func workerLoop(participant: Int, cpu: Int, name: String) {
        _ = name.withCString { pg_name_current_thread($0) }
        _ = pg_pin_current_thread(Int32(cpu))
        var seen: UInt64 = 0
        // The adaptive spin budget (see the type's documentation); a gap between two clock reads this long means
        // the thread was not running in between.
        var budget = spinNanoseconds
        let preemptedGap: UInt64 = 40_000
        var switches = pg_thread_involuntary_switches()
        while true {
            let waitStart = pg_now_ns()
            var lastCheck = waitStart
            var spins = 0
            var slept = false
            var preempted = false
            while generation.load(ordering: .sequentiallyConsistent) == seen {
                if stopping.load(ordering: .sequentiallyConsistent) { return }
                spins += 1
                if !slept && budget > 0 && spins & 63 != 0 {
                    pg_cpu_relax()
                    continue
                }
                if !slept {
                    let now = pg_now_ns()
                    if now - lastCheck > preemptedGap { preempted = true }
                    lastCheck = now
                    if now - waitStart < budget && !preempted { continue }
                }
                if !slept {
                    // Preemptions since the last look (a short phase, the way out of one) are not the next phase's.
                    switches = pg_thread_involuntary_switches()
                }
                slept = true
                sleepers.add(1, ordering: .sequentiallyConsistent)
                if generation.load(ordering: .sequentiallyConsistent) == seen && !stopping.load(ordering: .sequentiallyConsistent) {
                    _ = pg_futex_wait(futexWord, UInt32(truncatingIfNeeded: seen))
                }
                sleepers.subtract(1, ordering: .sequentiallyConsistent)
            }
            // Adapt the budget to how long this wait was.
            let gap = pg_now_ns() - waitStart
            if preempted {
                preemptedCount.add(1, ordering: .relaxed)
                switches = pg_thread_involuntary_switches()
                noteContention(now: pg_now_ns())
                budget /= 4
            } else if gap < spinNanoseconds {
                budget = min(spinNanoseconds, max(budget * 2, 2_000))  // spinning caught it, or a longer spin would have
            } else {
                budget /= 2
            }
            seen = generation.load(ordering: .sequentiallyConsistent)
            if stopping.load(ordering: .sequentiallyConsistent) { return }
            // Join the phase if its door is still open; otherwise it is over (or another one is), so skip it.
            let gen = seen & 0xFFFF_FFFF
            var state = door.load(ordering: .sequentiallyConsistent)
            var joined = false
            while state >> 32 == gen && state & Self.openBit != 0 {
                let (exchanged, original) = door.compareExchange(expected: state, desired: state + 1, ordering: .sequentiallyConsistent)
                if exchanged { joined = true; break }
                state = original
            }
            guard joined else {
                skippedCount.add(1, ordering: .relaxed)
                continue
            }
            joinedCount.add(1, ordering: .relaxed)
            let phaseStart = pg_now_ns()
            runPhase(participant)
            let phaseEnd = pg_now_ns()
            if phaseEnd - phaseStart > preemptedGap {
                // Long enough to have been preempted in; one system call tells.
                let count = pg_thread_involuntary_switches()
                if count != switches {
                    switches = count
                    noteContention(now: phaseEnd)
                }
            }
            let left = door.subtract(1, ordering: .sequentiallyConsistent).newValue
            if left & Self.insideMask == 0 && left & Self.openBit == 0 {
                // The last one out of a closed phase tells the caller.
                pg_atomic_store_u32(doneWord, UInt32(truncatingIfNeeded: gen))
                if callerSleeping.load(ordering: .sequentiallyConsistent) { _ = pg_futex_wake(doneWord, 1) }
            }
        }
    }

    /// Separate and not inlined, so the worker's reference to the job is released before it signals completion.
    @inline(never)
    private func runPhase(_ participant: Int) {
        phase.job!.run(participant: participant)
    }

    /// Publishes `job` to the workers, runs participant 0's share (which must finish every task nobody else has
    /// claimed) on the calling thread, closes the phase to late workers, then waits for the workers inside it:
    /// spinning up to the spin bound, then asleep. Traps after ``shutdown()`` when the pool has workers.
    public func run(_ job: any ParallelJob) {
        guard participantCount > 1 else { return job.run(participant: 0) }
        precondition(!stopping.load(ordering: .sequentiallyConsistent), "run after shutdown")
        phase.job = job
        let next = generation.add(1, ordering: .sequentiallyConsistent).newValue
        let gen = next & 0xFFFF_FFFF
        door.store(gen << 32 | Self.openBit, ordering: .sequentiallyConsistent)
        pg_atomic_store_u32(futexWord, UInt32(truncatingIfNeeded: next))
        if sleepers.load(ordering: .sequentiallyConsistent) > 0 { _ = pg_futex_wake(futexWord, Int32.max) }
        job.run(participant: 0)
        // Close the door; whoever is inside finishes, whoever comes later skips.
        let closed = door.bitwiseAnd(~Self.openBit, ordering: .sequentiallyConsistent).newValue
        if closed & Self.insideMask != 0 {
            let spinStart = pg_now_ns()
            var spins = 0
            while door.load(ordering: .sequentiallyConsistent) & Self.insideMask != 0 {
                spins += 1
                if spins & 63 != 0 { pg_cpu_relax(); continue }
                if pg_now_ns() - spinStart < spinNanoseconds { continue }
                callerSleeping.store(true, ordering: .sequentiallyConsistent)
                while true {
                    // Wait on the value just checked: a wake between the check and the wait then returns at once.
                    let seenDone = pg_atomic_load_u32(doneWord)
                    if seenDone == UInt32(truncatingIfNeeded: gen) { break }
                    _ = pg_futex_wait(doneWord, seenDone)
                }
                callerSleeping.store(false, ordering: .sequentiallyConsistent)
                break
            }
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
