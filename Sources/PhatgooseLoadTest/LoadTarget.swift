import PhatgooseDistributed
import PhatgooseLibrary
import PhatgooseRouting
import PhatgooseRuntime

/// What a load test drives: the routed layers of a library, served by a ``Runtime`` in this process or by a
/// ``DistributedRuntime`` over the ranks of an MPI world. Layers are named by their module index in the library.
///
/// # Thread safety
/// `apply` is called from every client thread at once.
public protocol LoadTarget: AnyObject, Sendable {
    /// One layer call; throws `RuntimeError(.overloaded)` when admission control refuses it.
    func apply(layer: Int, input: UnsafeBufferPointer<Float>, tokens: Int, output: UnsafeMutableBufferPointer<Float>,
               experts: UnsafeMutableBufferPointer<Int32>, weights: UnsafeMutableBufferPointer<Float>) throws
    /// Output slots per token at layer `layer`.
    func slots(ofLayer layer: Int) throws -> Int
    /// Counters since the target started.
    func statisticsSnapshot() -> RuntimeStatistics
    /// The routing every call uses.
    var routing: RoutingOptions { get }
    /// Threads that compute calls in this process (workers plus the caller).
    var participants: Int { get }
    /// Node of each participant.
    var participantNodes: [Int] { get }
    /// CPU of each participant, nil where unpinned.
    var participantCPUs: [Int?] { get }
    /// The executor, for reports.
    var executorName: String { get }
    /// Most calls admitted at once.
    var maxQueuedCalls: Int { get }
    /// The local runtime's options; nil for a distributed target.
    var runtimeOptions: RuntimeOptions? { get }
    /// The local runtime's topology; nil for a distributed target.
    var topology: Topology? { get }
    /// What each rank holds; nil for a local target.
    var ranks: [RankShare]? { get }
    /// Why the target serves no more calls (a rank died or hangs), or nil: the run then ends early.
    var failure: String? { get }
}

/// A ``Runtime`` in this process.
final class LocalTarget: LoadTarget {
    let runtime: Runtime
    private let handles: [LayerHandle]

    init(runtime: Runtime) throws {
        self.runtime = runtime
        let library = runtime.library
        handles = try library.modules.map { module in
            guard let handle = runtime.layer(named: module.name) else {
                throw LoadTestError(.library, "\(library.source.path): module \(module.name): expected the runtime to serve it, found it missing")
            }
            return handle
        }
    }

    func apply(layer: Int, input: UnsafeBufferPointer<Float>, tokens: Int, output: UnsafeMutableBufferPointer<Float>,
               experts: UnsafeMutableBufferPointer<Int32>, weights: UnsafeMutableBufferPointer<Float>) throws {
        try runtime.apply(handles[layer], input: input, tokens: tokens, output: output, experts: experts, weights: weights)
    }

    func slots(ofLayer layer: Int) throws -> Int { try runtime.slots(of: handles[layer]) }
    func statisticsSnapshot() -> RuntimeStatistics { runtime.statisticsSnapshot() }
    var routing: RoutingOptions { runtime.routing }
    var participants: Int { runtime.participants }
    var participantNodes: [Int] { runtime.participantNodes }
    var participantCPUs: [Int?] { runtime.participantCPUs }
    var executorName: String { runtime.executorKind.rawValue }
    var maxQueuedCalls: Int { runtime.options.maxQueuedCalls }
    var runtimeOptions: RuntimeOptions? { runtime.options }
    var topology: Topology? { runtime.topology }
    var ranks: [RankShare]? { nil }
    var failure: String? { nil }
}

/// A ``DistributedRuntime`` on rank 0: calls are served one at a time (in the order they take its lock); the
/// counters are the runtime's, one dispatch per call.
final class DistributedTarget: LoadTarget {
    let runtime: DistributedRuntime

    init(runtime: DistributedRuntime) { self.runtime = runtime }

    func apply(layer: Int, input: UnsafeBufferPointer<Float>, tokens: Int, output: UnsafeMutableBufferPointer<Float>,
               experts: UnsafeMutableBufferPointer<Int32>, weights: UnsafeMutableBufferPointer<Float>) throws {
        let (inWidth, outWidth) = runtime.widths(ofModule: layer)
        let slots = runtime.slots(ofModule: layer)
        guard input.count >= tokens * inWidth, output.count >= tokens * outWidth, experts.count >= tokens * slots, weights.count >= tokens * slots else {
            throw DistributedError(.shape, "layer \(runtime.moduleNames[layer]): buffers too small for \(tokens) tokens")
        }
        guard tokens > 0 else { return }
        try runtime.apply(module: layer, input: input.baseAddress!, tokens: tokens, output: output.baseAddress!,
                          experts: experts.baseAddress!, weights: weights.baseAddress!)
    }

    func slots(ofLayer layer: Int) throws -> Int { runtime.slots(ofModule: layer) }

    func statisticsSnapshot() -> RuntimeStatistics {
        let s = runtime.statistics
        var stats = RuntimeStatistics()
        stats.calls = s.calls
        stats.tokens = s.tokens
        stats.dispatches = s.calls
        stats.tokensPerExpert = s.tokensPerExpert
        return stats
    }

    var routing: RoutingOptions { runtime.routing }
    var participants: Int { 1 }
    var participantNodes: [Int] { [0] }
    var participantCPUs: [Int?] { [nil] }
    var executorName: String { "mpi" }
    var maxQueuedCalls: Int { Int.max }
    var runtimeOptions: RuntimeOptions? { nil }
    var topology: Topology? { nil }
    var ranks: [RankShare]? { runtime.shares }
    var failure: String? { runtime.failure?.message }
}
