import Foundation
import PhatgooseKernels
import PhatgooseLibrary
import PhatgooseRouting
import Synchronization

/// How a ``DistributedRuntime`` shards and serves.
public struct DistributedOptions: Sendable {
    /// Routing (router, top-k, granularity); nil takes the library's defaults.
    public var routing: RoutingOptions?
    /// Most bytes of expert weights one rank may hold; a rank whose share is larger refuses to start.
    public var memoryCapBytes: Int?
    /// Each expert's measured share of tokens, to balance ranks by load instead of bytes.
    public var expertLoad: [Double]?
    /// The costliest experts (by load when given, else bytes) held by every rank; their tokens are split over them.
    public var replicateHot: Int
    /// Most seconds to wait for a rank's answer before the call fails with `.timeout`.
    public var timeoutSeconds: Double

    /// Options; the defaults shard by bytes, replicate nothing and wait at most 30 s for a rank.
    public init(routing: RoutingOptions? = nil, memoryCapBytes: Int? = nil, expertLoad: [Double]? = nil, replicateHot: Int = 0,
                timeoutSeconds: Double = 30) {
        self.routing = routing
        self.memoryCapBytes = memoryCapBytes
        self.expertLoad = expertLoad
        self.replicateHot = replicateHot
        self.timeoutSeconds = timeoutSeconds
    }
}

/// What one rank holds.
public struct RankShare: Sendable, Equatable {
    /// The rank.
    public var rank: Int
    /// Bytes of expert weights it holds (its copies of `lora_A` and `lora_B`).
    public var residentBytes: Int
    /// Experts it holds.
    public var experts: Int
    /// Its process's resident set when it had loaded its share, in bytes (0 where unknown).
    public var processBytes: Int
}

/// Counters of a distributed runtime since it started.
public struct DistributedStatistics: Sendable {
    /// Calls served.
    public var calls = 0
    /// Tokens in them.
    public var tokens = 0
    /// Assignments (token, expert) run on each rank.
    public var assignmentsPerRank: [Int] = []
    /// Tokens routed to each expert (library index).
    public var tokensPerExpert: [Int] = []
    /// Bytes sent to and received from other ranks.
    public var bytesSent = 0
    public var bytesReceived = 0
    /// Nanoseconds rank 0 spent waiting for other ranks' rows after running its own share.
    public var waitNanos: UInt64 = 0
}

/// PHATGOOSE routing over experts sharded across the ranks of an MPI world, on rank 0 (the host).
///
/// Every rank loads the same library; the experts are placed over the ranks (``RankPlacement``), and each rank keeps
/// copies of its share only. A call at one module: rank 0 routes (the gates are on every rank) and builds the
/// dispatch plan, sends each rank the assignments of the experts it holds with the rows of their tokens (each
/// token's row once per rank), runs its own share while the messages travel, receives each rank's expanded rows and
/// combines every token's rows in ascending expert order: the bits of a single process (``LayerExecutor``).
/// The other ranks run ``ExpertServer/serve(world:memoryCapBytes:load:)`` until ``shutdown()``.
///
/// A rank that does not answer within `timeoutSeconds` makes the call throw `.timeout` naming it, and every later
/// call `.stopped`: the runtime never hangs on a dead or stuck rank.
///
/// # Thread safety
/// Calls from any thread are served one at a time (a lock around each), in the order they take the lock.
public final class DistributedRuntime: @unchecked Sendable {
    /// The MPI world (this is its rank 0).
    public let world: MPIWorld
    /// The routing every call uses.
    public let routing: RoutingOptions
    /// Where each expert lives.
    public let placement: RankPlacement
    /// What each rank holds, rank 0 first.
    public let shares: [RankShare]
    /// The library's module names, in order.
    public let moduleNames: [String]

    struct Module {
        let name: String
        let inWidth: Int
        let outWidth: Int
        /// Library-wide expert index of each candidate.
        let experts: [Int32]
        /// The ranks holding each candidate.
        let holders: [[Int]]
        let router: LayerRouter
    }

    private let modules: [Module]
    private let moduleIndex: [String: Int]
    private let shard: ExpertShard
    private let timeoutNanos: UInt64
    /// Held for the whole of each call: one call at a time uses MPI and the buffers.
    private let lock = NSLock()
    private let calls: CallState

    /// Per-call buffers and counters, used under the lock.
    final class CallState {
        var routing = RoutingResult(tokenCount: 0, slots: 0)
        var plan = DispatchPlan()
        let routeScratch = ScratchBuffer()
        let h = ScratchBuffer()
        let rows = ScratchBuffer()
        var outgoing: [MessageBuffer]
        var incoming: [MessageBuffer]
        var sends: [PendingMessage]
        var receives: [PendingMessage]
        /// Per rank: the pieces of the plan it runs, in order (each within one candidate's assignments).
        var segments: [[CallCodec.Segment]]
        /// Tokens in the order their rows go into a message.
        var order: [Int32] = []
        var pending: [PendingMessage] = []
        /// Token to its row in the message being built; -1 when not in it.
        var localToken: [Int32] = []
        var failure: DistributedError?
        var statistics = DistributedStatistics()
        var nextCall: Int64 = 0

        init(ranks: Int) {
            outgoing = (0..<ranks).map { _ in MessageBuffer() }
            incoming = (0..<ranks).map { _ in MessageBuffer() }
            sends = (0..<ranks).map { _ in PendingMessage() }
            receives = (0..<ranks).map { _ in PendingMessage() }
            segments = [[CallCodec.Segment]](repeating: [], count: ranks)
            statistics.assignmentsPerRank = [Int](repeating: 0, count: ranks)
        }
    }

    /// Shards `library` over `world` (rank 0 must call this while every other rank runs
    /// ``ExpertServer/serve(world:memoryCapBytes:load:)``): places the experts, tells every rank its share and
    /// waits until each has loaded it. Throws `.rank` with the rank's own message when one cannot (its library
    /// differs, its share exceeds the memory cap), `.timeout` when one does not answer.
    public init(library: ExpertLibrary, world: MPIWorld, options: DistributedOptions = DistributedOptions()) throws(DistributedError) {
        guard world.rank == 0 else { throw DistributedError(.option, "distributed runtime: expected rank 0 (the host), found rank \(world.rank); other ranks serve experts") }
        guard options.timeoutSeconds.isFinite, options.timeoutSeconds > 0 else {
            throw DistributedError(.option, "timeout: expected a positive number of seconds, found \(options.timeoutSeconds)")
        }
        if let cap = options.memoryCapBytes, cap < 0 { throw DistributedError(.option, "memory cap: expected at least 0 bytes, found \(cap)") }
        self.world = world
        let routing = options.routing ?? RoutingOptions(defaults: library.routing)
        self.routing = routing
        timeoutNanos = UInt64(options.timeoutSeconds * 1e9)
        let placement = try RankPlacement.make(rankCount: world.size, bytes: ExpertShard.expertBytes(library), load: options.expertLoad,
                                               replicateHot: options.replicateHot)
        self.placement = placement
        var modules: [Module] = []
        for module in library.modules {
            let router: LayerRouter
            do { router = try LayerRouter(module: module, options: routing) } catch {
                throw DistributedError(.option, "module \(module.name): \(error.message)")
            }
            modules.append(Module(name: module.name, inWidth: module.inWidth, outWidth: module.outWidth,
                                  experts: module.experts.map { $0.expert.rawValue },
                                  holders: module.experts.map { $0.expert.int < placement.ranks.count ? placement.ranks[$0.expert.int] : [] },
                                  router: router))
        }
        self.modules = modules
        moduleNames = modules.map(\.name)
        moduleIndex = Dictionary(modules.enumerated().map { ($1.name, $0) }, uniquingKeysWith: { a, _ in a })
        let calls = CallState(ranks: world.size)
        calls.statistics.tokensPerExpert = [Int](repeating: 0, count: library.experts.count)

        // Hello to every other rank, then rank 0 copies its own share while they load theirs.
        let hello = MessageBuffer()
        hello.append(Wire.Kind.hello.rawValue)
        hello.append(Wire.magic)
        hello.append(Wire.version)
        hello.append(Int32(library.modules.count))
        hello.append(Int32(library.experts.count))
        hello.append(library.shardFingerprint)
        hello.append(Int64(options.memoryCapBytes ?? -1))
        hello.append(Kernels.activeISA.rawValue)
        for holders in placement.ranks {
            hello.append(Int32(holders.count))
            for rank in holders { hello.append(Int32(rank)) }
        }
        for rank in 1..<max(world.size, 1) {
            try world.send(hello.pointer, bytes: hello.count, to: rank, tag: Wire.commandTag, into: calls.sends[rank])
            calls.incoming[rank].reserve(4096)
            try world.receive(calls.incoming[rank].pointer, capacity: calls.incoming[rank].capacity, from: rank, tag: Wire.answerTag,
                              into: calls.receives[rank])
        }
        var ownError: DistributedError?
        var shard: ExpertShard?
        do { shard = try ExpertShard(library: library, held: Set(placement.experts(of: 0)), memoryCap: options.memoryCapBytes, who: "rank 0") } catch {
            ownError = error
        }
        let others = Array(1..<max(world.size, 1))
        // Loading a share reads it from disk: allow each rank the timeout plus time for its bytes at 100 MB/s.
        let largest = others.map { placement.experts(of: $0).reduce(0) { $0 + ExpertShard.expertBytes(library)[$1] } }.max() ?? 0
        try world.wait(others.map { calls.sends[$0] } + others.map { calls.receives[$0] }, timeoutNanos: timeoutNanos + UInt64(largest) * 10,
                       context: { "loading its share of \(library.source.path)" })
        var shares = [RankShare(rank: 0, residentBytes: shard?.residentBytes ?? 0, experts: shard?.expertCount ?? 0,
                                processBytes: ProcessInfo.residentSetBytes())]
        var failures: [String] = []
        if let ownError { failures.append(ownError.message) }
        for rank in others {
            var reader = MessageReader(calls.incoming[rank].pointer, count: calls.receives[rank].received, what: "rank \(rank)'s ready message")
            let kind = try reader.read(Int32.self)
            guard kind == Wire.Kind.ready.rawValue else {
                throw DistributedError(.shape, "rank \(rank)'s ready message: expected kind \(Wire.Kind.ready.rawValue), found \(kind)")
            }
            let status = try reader.read(Int32.self)
            let resident = try reader.read(Int64.self)
            let experts = try reader.read(Int32.self)
            let process = try reader.read(Int64.self)
            if status != 0 { failures.append(reader.rest) }
            shares.append(RankShare(rank: rank, residentBytes: Int(resident), experts: Int(experts), processBytes: Int(process)))
        }
        self.shares = shares
        guard failures.isEmpty, let shard else {
            Self.sendStop(world: world, timeoutNanos: timeoutNanos)
            let code: DistributedError.Code = ownError?.code == .memoryCap || failures.contains { $0.contains("memory cap") } ? .memoryCap : .rank
            throw DistributedError(code, failures.joined(separator: "; "))
        }
        self.shard = shard
        self.calls = calls
    }

    /// The index of module `name`, or nil.
    public func module(named name: String) -> Int? { moduleIndex[name] }

    /// Output slots per token at module `module`.
    public func slots(ofModule module: Int) -> Int { modules[module].router.slots }

    /// Input and output widths of module `module`.
    public func widths(ofModule module: Int) -> (inWidth: Int, outWidth: Int) { (modules[module].inWidth, modules[module].outWidth) }

    /// The failure that stopped the runtime (a rank that did not answer, an MPI error), or nil while it serves.
    public var failure: DistributedError? { lock.withLock { calls.failure?.code == .stopped && world.stopped.load(ordering: .relaxed) ? nil : calls.failure } }

    /// Counters since the runtime started.
    public var statistics: DistributedStatistics { lock.withLock { calls.statistics } }

    /// Routes `tokens` rows of `input` at module `module` and adds the mixture delta into `output` ([tokens, out],
    /// which the caller zeroes for the delta alone); `experts` and `weights` ([tokens, slots]) receive each token's
    /// choices (library expert indices, -1 for padding). The bits equal a single process's. A call that fails
    /// writes nothing.
    public func apply(module: Int, input: UnsafePointer<Float>, tokens: Int, output: UnsafeMutablePointer<Float>,
                      experts: UnsafeMutablePointer<Int32>, weights: UnsafeMutablePointer<Float>) throws(DistributedError) {
        guard modules.indices.contains(module) else {
            throw DistributedError(.shape, "module: expected an index in 0..<\(modules.count), found \(module)")
        }
        guard tokens >= 0 else { throw DistributedError(.shape, "tokens: expected at least 0, found \(tokens)") }
        let result: Result<Void, DistributedError> = lock.withLock {
            if let failure = calls.failure { return .failure(DistributedError(.stopped, "distributed runtime: stopped (\(failure.message))")) }
            do throws(DistributedError) {
                try call(calls, module: modules[module], index: module, x: input, tokens: tokens, out: output, experts: experts, weights: weights)
                return .success(())
            } catch {
                calls.failure = error
                world.cancel(calls.sends + calls.receives)
                return .failure(error)
            }
        }
        try result.get()
    }

    private func call(_ calls: CallState, module: Module, index: Int, x: UnsafePointer<Float>, tokens: Int,
                      out: UnsafeMutablePointer<Float>, experts: UnsafeMutablePointer<Int32>, weights: UnsafeMutablePointer<Float>) throws(DistributedError) {
        calls.statistics.calls += 1
        calls.statistics.tokens += tokens
        let slots = module.router.slots
        guard tokens > 0 else { return }
        calls.routing.route(module.router, x: x, ldx: module.inWidth, tokens: tokens, scratch: calls.routeScratch)
        calls.plan.build(from: calls.routing, candidates: module.experts.count)
        let plan = calls.plan
        for c in 0..<module.experts.count where Int(module.experts[c]) < calls.statistics.tokensPerExpert.count {
            calls.statistics.tokensPerExpert[Int(module.experts[c])] += plan.range(of: c).count
        }
        let ranks = world.size
        try CallCodec.split(plan, holders: module.holders, module: module.name, into: &calls.segments)
        let rows = calls.rows.reserve(plan.assignmentCount * module.outWidth)
        if calls.localToken.count < tokens { calls.localToken = [Int32](repeating: -1, count: tokens) }
        calls.nextCall &+= 1
        let callID = calls.nextCall
        calls.pending.removeAll(keepingCapacity: true)
        try plan.tokens.withUnsafeBufferPointer { (planTokens) throws(DistributedError) in
            try plan.weights.withUnsafeBufferPointer { (planWeights) throws(DistributedError) in
                // Messages to the other ranks first, so they compute while rank 0 runs its own share.
                for rank in 1..<max(ranks, 1) where !calls.segments[rank].isEmpty {
                    let n = CallCodec.encodeCall(calls.segments[rank], module: index, callID: callID, planTokens: planTokens.baseAddress!,
                                                 planWeights: planWeights.baseAddress!, x: x, inWidth: module.inWidth,
                                                 localToken: &calls.localToken, order: &calls.order, into: calls.outgoing[rank])
                    let answer = calls.incoming[rank]
                    answer.reserve(Wire.rowsHeader + n * module.outWidth * 4 + 4096)
                    try world.receive(answer.pointer, capacity: answer.capacity, from: rank, tag: Wire.answerTag, into: calls.receives[rank])
                    try world.send(calls.outgoing[rank].pointer, bytes: calls.outgoing[rank].count, to: rank, tag: Wire.commandTag, into: calls.sends[rank])
                    calls.pending += [calls.sends[rank], calls.receives[rank]]
                    calls.statistics.bytesSent += calls.outgoing[rank].count
                    calls.statistics.assignmentsPerRank[rank] += n
                }
                // Rank 0's own share, from the plan directly.
                for segment in calls.segments[0] {
                    let c = segment.candidate
                    guard let view = shard.views[index][c] else {
                        throw DistributedError(.shape, "module \(module.name): rank 0 was placed candidate \(c) but holds no copy")
                    }
                    let h = calls.h.reserve(segment.count * view.rank)
                    LayerExecutor.runExpert(view, x: x, ldx: module.inWidth, inWidth: module.inWidth, outWidth: module.outWidth,
                                            tokens: planTokens.baseAddress! + segment.start, weights: planWeights.baseAddress! + segment.start,
                                            count: segment.count, h: h, rows: rows + segment.start * module.outWidth)
                    calls.statistics.assignmentsPerRank[0] += segment.count
                }
            }
        }
        if !calls.pending.isEmpty {
            let waitStart = MPIWorld.now()
            try world.wait(calls.pending, timeoutNanos: timeoutNanos, context: { "module \(module.name), \(tokens) tokens" })
            calls.statistics.waitNanos += MPIWorld.now() - waitStart
            for rank in 1..<max(ranks, 1) where !calls.segments[rank].isEmpty {
                let received = calls.receives[rank].received
                calls.statistics.bytesReceived += received
                var reader = MessageReader(calls.incoming[rank].pointer, count: received, what: "rank \(rank)'s rows for module \(module.name)")
                try CallCodec.decodeRows(&reader, callID: callID, segments: calls.segments[rank], outWidth: module.outWidth, into: rows)
            }
        }
        // Outputs only once every rank has answered: a failed call writes nothing.
        LayerExecutor.combine(plan, rows: rows, outWidth: module.outWidth, tokenRange: 0..<tokens, out: out, ldo: module.outWidth)
        for i in 0..<(tokens * slots) {
            let c = calls.routing.candidates[i]
            experts[i] = c < 0 ? -1 : module.experts[Int(c)]
            weights[i] = calls.routing.weights[i]
        }
    }

    /// Tells every other rank to stop serving (they then finalise MPI and exit their serve loop). Idempotent; later
    /// calls throw `.stopped`.
    public func shutdown() {
        let already: Bool = lock.withLock {
            if calls.failure?.code == .stopped { return true }
            if calls.failure == nil { calls.failure = DistributedError(.stopped, "shut down") }
            world.cancel(calls.sends + calls.receives)
            return false
        }
        if !already { Self.sendStop(world: world, timeoutNanos: timeoutNanos) }
    }

    static func sendStop(world: MPIWorld, timeoutNanos: UInt64) {
        guard world.rank == 0, !world.isBroken, !world.stopped.exchange(true, ordering: .acquiringAndReleasing) else { return }
        // The word must outlive the sends.
        let stop = UnsafeMutablePointer<Int32>.allocate(capacity: 1)
        stop.initialize(to: Wire.Kind.stop.rawValue)
        defer { stop.deallocate() }
        let pending = (1..<max(world.size, 1)).map { _ in PendingMessage() }
        for (i, message) in pending.enumerated() {
            try? world.send(stop, bytes: 4, to: i + 1, tag: Wire.commandTag, into: message)
        }
        do { try world.wait(pending, timeoutNanos: min(timeoutNanos, 5_000_000_000), context: { "stop" }) } catch { world.cancel(pending) }
    }
}

extension ProcessInfo {
    /// This process's resident set in bytes (Linux: /proc/self/statm), 0 where unknown.
    static func residentSetBytes() -> Int {
        guard let text = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return 0 }
        let fields = text.split(separator: " ")
        guard fields.count > 1, let pages = Int(fields[1]) else { return 0 }
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    }
}
