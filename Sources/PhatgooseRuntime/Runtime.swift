import Dispatch
import Foundation
import PhatgooseFormats
import PhatgooseLibrary
import PhatgooseRouting
import CPhatgooseSystem
import Synchronization

/// A handle to one routed layer, resolved once from its module name and reused for every call.
public struct LayerHandle: Hashable, Sendable {
    /// The module name.
    public let name: String
    /// Position of the module in the library when the handle was made.
    public let index: Int
    let snapshot: Int
}

/// How a ``Runtime`` serves.
public struct RuntimeOptions: Sendable {
    /// Routing (router, top-k, granularity); nil takes the library's defaults.
    public var routing: RoutingOptions?
    /// Worker threads besides the caller; nil: one fewer than the CPUs of the topology.
    public var workers: Int?
    /// Which executor runs each call's parallel phases (default ``ExecutorKind/pinned``).
    public var executor: ExecutorKind
    /// nil: detect with libnuma.
    public var topology: Topology?
    /// Where expert weights live (default ``PlacementPolicy/distribute``).
    public var placement: PlacementPolicy
    /// Measured share of tokens per expert (for example from `phatgoose profile`), to balance placement by load.
    public var loadProfile: [Double]?
    /// Most bytes of expert weights the runtime may hold (copies included); loading more fails with `.memoryCap`.
    public var memoryCapBytes: Int?
    /// Most calls admitted at once (running plus waiting); further calls fail at once with `.overloaded`.
    public var maxQueuedCalls: Int
    /// Rows per work item; nil chooses from the call's size.
    public var tileRows: Int?
    /// How long idle pinned workers spin before sleeping on a futex (0: they sleep at once).
    public var spinMicroseconds: Int
    /// Calls of fewer tokens run on the caller alone, without waking a worker (1: every call may fan out). For a
    /// host whose own threads share the cores, as in a model's forward pass: decode steps of a few tokens then cost
    /// no hand-off, and only large calls (prefill) use the workers.
    public var parallelMinTokens: Int
    /// While the pinned workers' CPUs are contended (a worker was seen preempted: a busy process beside it,
    /// docs/threading.md), dispatches of fewer tokens run on the caller alone, as a preempted worker holding a task
    /// would make them wait a time slice. 0 turns this off (every dispatch from `parallelMinTokens` up fans out).
    public var contendedMinTokens: Int
    /// Most tokens of one call in one dispatch: a larger call (a prefill) is served in chunks of this many tokens
    /// (whole sequences when routing per sequence), so calls queued behind it (decode steps) join the next dispatch
    /// instead of waiting for all of it. The results are the same bits as in one piece.
    public var chunkTokens: Int
    /// Most tokens of one dispatch, summed over its calls and their layers (at least one chunk of the oldest call
    /// is always taken): the calls beyond it, in queue order, wait for the next dispatch. Merging many large calls
    /// into one dispatch gains nothing (each is already large enough to batch) and spreads the dispatch's working set
    /// past the caches; decode calls of a few tokens still merge by the dozen. nil: no bound.
    public var dispatchTokens: Int?
    /// Dispatch lanes: how many dispatches may run at once, each over calls the others have not taken. With one
    /// lane held, its dispatches spread each call's work over the workers (a holder of another lane that finds itself
    /// alone moves to lane 0, the one with the workers); with more, every lane's dispatch runs on its own caller's
    /// thread alone (the workers go idle), so independent calls run side by side without a hand-off or a barrier per
    /// phase. nil: one per participant (workers plus the caller); 1: one dispatch at a time.
    public var lanes: Int?
    /// Allow more workers than the topology has CPUs (each would then share a CPU with another thread and spin on
    /// it); off, such a request is refused.
    public var oversubscribe: Bool
    /// Sees every phase of every call; nil costs nothing.
    public var observer: (any RuntimeObserver)?

    /// Creates options; each argument sets the property of the same name.
    public init(routing: RoutingOptions? = nil, workers: Int? = nil, executor: ExecutorKind = .pinned, topology: Topology? = nil,
                placement: PlacementPolicy = .distribute, loadProfile: [Double]? = nil, memoryCapBytes: Int? = nil,
                maxQueuedCalls: Int = 64, tileRows: Int? = nil, spinMicroseconds: Int = 50, parallelMinTokens: Int = 1,
                contendedMinTokens: Int = 64, chunkTokens: Int = 256, dispatchTokens: Int? = 512, lanes: Int? = nil, oversubscribe: Bool = false,
                observer: (any RuntimeObserver)? = nil) {
        self.routing = routing
        self.workers = workers
        self.executor = executor
        self.topology = topology
        self.placement = placement
        self.loadProfile = loadProfile
        self.memoryCapBytes = memoryCapBytes
        self.maxQueuedCalls = maxQueuedCalls
        self.tileRows = tileRows
        self.spinMicroseconds = spinMicroseconds
        self.parallelMinTokens = parallelMinTokens
        self.contendedMinTokens = contendedMinTokens
        self.chunkTokens = chunkTokens
        self.dispatchTokens = dispatchTokens
        self.lanes = lanes
        self.oversubscribe = oversubscribe
        self.observer = observer
    }
}

/// Counters since the runtime started.
public struct RuntimeStatistics: Sendable, Equatable {
    /// All counters zero.
    public init() {}
    /// Layer calls completed.
    public var calls: Int = 0
    /// Tokens over those calls.
    public var tokens: Int = 0
    /// Calls refused by admission control.
    public var rejected: Int = 0
    /// Dispatches run: each serves, on one lane, the queued calls no other lane has taken when it starts (a chunk of
    /// each large one), within the dispatch budget.
    public var dispatches: Int = 0
    /// Calls served in a dispatch with other calls.
    public var mergedCalls: Int = 0
    /// Dispatches run on their lane's caller alone because another lane was held (calls in parallel rather than
    /// one call's work spread over the workers).
    public var concurrentDispatches: Int = 0
    /// Token assignments per expert index (a token choosing two experts counts once for each).
    public var tokensPerExpert: [Int] = []
}

/// The result of an array-based call.
public struct LayerOutput: Sendable {
    /// The mixture delta, [tokens, out].
    public var delta: [Float]
    /// Expert index per (token, slot), [tokens, slots]; -1 for padding.
    public var experts: [Int32]
    /// Mixture weight per (token, slot).
    public var weights: [Float]
    /// Slots per token: k, or the candidate count for the uniform router.
    public var slots: Int
}

/// Serves an expert library: open it once, resolve layer names to handles once, then apply layers from any number of
/// threads at once.
///
/// Each call routes its tokens, builds a dispatch plan and runs every chosen expert once over its gathered tokens on
/// the worker threads that own the expert's weights (see `docs/threading.md`). Results equal the single-threaded
/// `LayerExecutor`'s bit for bit.
///
/// # Thread safety
/// All methods may be called from any thread at any time. Calls queue first come, first served; whenever a
/// dispatch lane is free, a waiting caller holds it, takes the queued calls no other lane has taken and runs them as
/// one dispatch (calls at the same layer share one routing pass and one plan; calls at different layers share the
/// phases), then wakes their callers. One lane alone spreads its dispatch over the workers; several lanes run their
/// dispatches side by side, each on its holder (``RuntimeOptions/lanes``). Waiting calls are bounded by `maxQueuedCalls`, beyond which a call fails at once with `.overloaded`.
/// `addExpert`/`removeExpert` publish a new snapshot atomically; calls in flight finish on the snapshot they began
/// with. After `shutdown()`, calls fail with `.shutDown`.
public final class Runtime: Sendable {
    /// The options the runtime was created with.
    public let options: RuntimeOptions
    /// The topology in use: `options.topology`, or the detected one.
    public let topology: Topology
    /// Routing in force (the library's defaults with `options.routing` applied).
    public let routing: RoutingOptions
    private let current: Locked<LibrarySnapshot>
    private let changes = Locked<Int>(0)
    /// Lane 0's scheduler runs on the executor; every other lane's on its holder alone.
    private let lanes: [Locked<Dispatcher>]
    private let queue: Locked<CallQueue>
    let executor: any ParallelExecutor
    private let admitted = Atomic<Int>(0)
    private let isShutDown = Atomic<Bool>(false)
    private let statistics = Locked<RuntimeStatistics>(RuntimeStatistics())

    /// Serves `library`.
    public init(library: ExpertLibrary, options: RuntimeOptions = RuntimeOptions()) throws {
        self.options = options
        let topology = options.topology ?? Topology.detect()
        self.topology = topology
        routing = options.routing ?? RoutingOptions(defaults: library.routing)
        guard options.maxQueuedCalls >= 1 else { throw RuntimeError(.option, "max queued calls: expected at least 1, found \(options.maxQueuedCalls)") }
        let workers = options.workers ?? max(0, topology.cpuCount - 1)
        guard workers >= 0 && workers <= 1024 else { throw RuntimeError(.option, "workers: expected 0 to 1024, found \(workers)") }
        guard options.oversubscribe || workers <= topology.cpuCount else {
            throw RuntimeError(.option, "workers: expected at most \(topology.cpuCount), the CPUs of the topology (the default is one fewer, as the caller works too), found \(workers): more workers than CPUs share CPUs and spin against each other; set oversubscribe to allow it")
        }
        guard options.chunkTokens >= 1 else { throw RuntimeError(.option, "chunk tokens: expected at least 1, found \(options.chunkTokens)") }
        if let budget = options.dispatchTokens, budget < 1 { throw RuntimeError(.option, "dispatch tokens: expected at least 1, found \(budget)") }
        if let tile = options.tileRows, tile < 1 { throw RuntimeError(.option, "tile rows: expected at least 1, found \(tile)") }
        guard options.spinMicroseconds >= 0 && options.spinMicroseconds <= 1_000_000 else {
            throw RuntimeError(.option, "spin microseconds: expected 0 to 1000000, found \(options.spinMicroseconds)")
        }
        guard options.parallelMinTokens >= 1 else {
            throw RuntimeError(.option, "parallel min tokens: expected at least 1, found \(options.parallelMinTokens)")
        }
        guard options.contendedMinTokens >= 0 else {
            throw RuntimeError(.option, "contended min tokens: expected 0 (off) or more, found \(options.contendedMinTokens)")
        }
        let snapshot = try LibrarySnapshot.build(id: 0, library: library, retired: [], options: routing, topology: topology,
                                                 policy: options.placement, load: options.loadProfile, memoryCap: options.memoryCapBytes)
        current = Locked(snapshot)
        switch options.executor {
        case .pinned: executor = PinnedWorkerPool(topology: topology, workers: workers, spinMicroseconds: options.spinMicroseconds)
        case .dispatch: executor = DispatchParallelExecutor(topology: topology, workers: workers)
        }
        let laneCount = options.lanes ?? executor.participantCount
        guard laneCount >= 1 && laneCount <= executor.participantCount else {
            executor.shutdown()
            throw RuntimeError(.option, "lanes: expected 1 to \(executor.participantCount) (the participants: workers plus the caller), found \(laneCount)")
        }
        var lanes: [Locked<Dispatcher>] = []
        for lane in 0..<laneCount {
            let laneExecutor = lane == 0 ? executor : PinnedWorkerPool(topology: topology, workers: 0, spinMicroseconds: 0)
            let scheduler = LayerScheduler(executor: laneExecutor)
            scheduler.tileRows = options.tileRows
            scheduler.parallelMinTokens = options.parallelMinTokens
            scheduler.contendedMinTokens = options.contendedMinTokens
            scheduler.observer = options.observer
            // Events of lane l's holder come as participant (participants + l - 1), after the workers.
            scheduler.workerBase = lane == 0 ? 0 : executor.participantCount + lane - 1
            lanes.append(Locked(Dispatcher(scheduler: scheduler, capacity: options.maxQueuedCalls)))
        }
        self.lanes = lanes
        queue = Locked(CallQueue(capacity: options.maxQueuedCalls, lanes: laneCount))
        statistics.withLock { $0.tokensPerExpert = [Int](repeating: 0, count: library.experts.count) }
    }

    /// Opens and serves the library at `path` (a directory or a packed file).
    public convenience init(path: String, options: RuntimeOptions = RuntimeOptions()) throws {
        try self.init(library: ExpertLibrary.load(path: path), options: options)
    }

    deinit { executor.shutdown() }

    /// The library currently served.
    public var library: ExpertLibrary { current.withLock { $0 }.library }

    /// Participants per call: workers plus the caller.
    public var participants: Int { executor.participantCount }
    /// Dispatch lanes (``RuntimeOptions/lanes``); lane l > 0 reports its events as participant `participants + l - 1`.
    public var laneCount: Int { lanes.count }
    /// The kind of executor in use.
    public var executorKind: ExecutorKind { executor.kind }
    /// CPU each participant is pinned to (nil for the caller or unpinned workers).
    public var participantCPUs: [Int?] { executor.participantCPUs }
    /// The node of each participant.
    public var participantNodes: [Int] { executor.participantNodes }

    /// The handle of the module named `name`, or nil.
    public func layer(named name: String) -> LayerHandle? {
        let snapshot = current.withLock { $0 }
        return snapshot.library.moduleIndex(of: name).map { LayerHandle(name: name, index: $0, snapshot: snapshot.id) }
    }

    /// Output slots per token of `layer` (k, or the candidate count for the uniform router).
    public func slots(of layer: LayerHandle) throws -> Int {
        let snapshot = current.withLock { $0 }
        return snapshot.routers[try resolve(layer, in: snapshot)].slots
    }

    /// Widths of `layer`: (in, out).
    public func widths(of layer: LayerHandle) throws -> (inWidth: Int, outWidth: Int) {
        let snapshot = current.withLock { $0 }
        let module = snapshot.library.modules[try resolve(layer, in: snapshot)]
        return (module.inWidth, module.outWidth)
    }

    private func resolve(_ layer: LayerHandle, in snapshot: LibrarySnapshot) throws(RuntimeError) -> Int {
        if layer.snapshot == snapshot.id { return layer.index }
        guard let index = snapshot.library.moduleIndex(of: layer.name) else {
            throw RuntimeError(.notFound, "layer \(layer.name): expected a module of the library, found none (its last expert was removed)")
        }
        return index
    }

    /// Adds the mixture delta of `layer` for `tokens` rows of `input` ([tokens, in], row-major F32) into `output`
    /// ([tokens, out]). When given, `experts` and `weights` receive each token's choices: `tokens` rows of
    /// `experts.count / tokens` entries (the two buffers the same size, a multiple of `tokens`, at least
    /// `tokens * slots`), the first ``slots(of:)`` of each row the token's experts and weights, any beyond them
    /// expert -1 and weight 0. So buffers sized for more slots than the layer has stay valid when the uniform
    /// router's slots shrink (an expert removed between sizing them and the call).
    ///
    /// A token whose input row (or, routing per sequence, whose sequence) holds a NaN or infinite value is not
    /// routed: its experts are -1 and its weights NaN in every slot, and nothing is added to its output row. The
    /// other tokens are applied as usual; then the call throws a ``RuntimeError/Code/nonFiniteInput`` error naming
    /// how many tokens were left unrouted and the first of them.
    ///
    /// Allocation-free once the runtime has served a call of this size.
    public func apply(_ layer: LayerHandle, input: UnsafeBufferPointer<Float>, tokens: Int, output: UnsafeMutableBufferPointer<Float>,
                      experts: UnsafeMutableBufferPointer<Int32>? = nil, weights: UnsafeMutableBufferPointer<Float>? = nil) throws {
        let snapshot = try begin(tokens: tokens)
        let (m, stride) = try check(layer, in: snapshot, input: input, tokens: tokens, output: output, experts: experts, weights: weights,
                                    sharedInWidth: nil)
        guard tokens > 0 else { return }
        try admit()
        defer { admitted.subtract(1, ordering: .sequentiallyConsistent) }
        let request = takeRequest()
        defer { returnRequest(request) }
        request.prepare(snapshot: snapshot, x: input.baseAddress!, tokens: tokens, layers: 1)
        request.setLayer(0, module: m, out: output.baseAddress!, experts: experts?.baseAddress, weights: weights?.baseAddress, stride: stride)
        try serve(request)
        if let unrouted = request.firstUnroutedLayer() {
            throw Self.nonFiniteInput(layer, count: unrouted.count, of: tokens, first: unrouted.first)
        }
    }

    /// The error of a call that left tokens unrouted.
    private static func nonFiniteInput(_ layer: LayerHandle, count: Int, of tokens: Int, first: Int) -> RuntimeError {
        RuntimeError(.nonFiniteInput, "layer \(layer.name): expected finite input values, found NaN or infinite values in the row (or sequence) "
                     + "of \(count) of \(tokens) tokens, the first token \(first); those tokens were not routed (experts -1, weights NaN, nothing "
                     + "added to their output rows), the others were applied")
    }

    /// Several layers that share one input (q, k and v): one admission, one call in the queue (its layers run in the
    /// same dispatches), each layer's delta added into its own output.
    public func apply(_ layers: [LayerHandle], input: UnsafeBufferPointer<Float>, tokens: Int, outputs: [UnsafeMutableBufferPointer<Float>],
                      experts: [UnsafeMutableBufferPointer<Int32>]? = nil, weights: [UnsafeMutableBufferPointer<Float>]? = nil) throws {
        guard !layers.isEmpty, outputs.count == layers.count, experts.map({ $0.count == layers.count }) ?? true,
              weights.map({ $0.count == layers.count }) ?? true, (experts == nil) == (weights == nil)
        else { throw RuntimeError(.shape, "apply: expected one output (and routing buffers, both or neither) per layer, found \(layers.count) layers and \(outputs.count) outputs") }
        let snapshot = try begin(tokens: tokens)
        var modules: [(index: Int, stride: Int)] = []
        for (i, layer) in layers.enumerated() {
            let shared = i == 0 ? nil : snapshot.library.modules[modules[0].index].inWidth
            modules.append(try check(layer, in: snapshot, input: input, tokens: tokens, output: outputs[i], experts: experts?[i],
                                     weights: weights?[i], sharedInWidth: shared))
        }
        guard tokens > 0 else { return }
        // The layers run in one dispatch, so their outputs must be distinct memory.
        for i in outputs.indices {
            let width = snapshot.library.modules[modules[i].index].outWidth
            let (lower, upper) = (UnsafeRawPointer(outputs[i].baseAddress!), UnsafeRawPointer(outputs[i].baseAddress! + tokens * width))
            for j in outputs.indices where j < i {
                let otherWidth = snapshot.library.modules[modules[j].index].outWidth
                let (otherLower, otherUpper) = (UnsafeRawPointer(outputs[j].baseAddress!), UnsafeRawPointer(outputs[j].baseAddress! + tokens * otherWidth))
                guard upper <= otherLower || otherUpper <= lower else {
                    throw RuntimeError(.shape, "layers \(layers[j].name) and \(layers[i].name): expected outputs that do not overlap, found them sharing memory")
                }
            }
        }
        try admit()
        defer { admitted.subtract(1, ordering: .sequentiallyConsistent) }
        let request = takeRequest()
        defer { returnRequest(request) }
        request.prepare(snapshot: snapshot, x: input.baseAddress!, tokens: tokens, layers: layers.count)
        for (i, m) in modules.enumerated() {
            request.setLayer(i, module: m.index, out: outputs[i].baseAddress!, experts: experts?[i].baseAddress, weights: weights?[i].baseAddress,
                             stride: m.stride)
        }
        try serve(request)
        if let unrouted = request.firstUnroutedLayer() {
            throw Self.nonFiniteInput(layers[unrouted.layer], count: unrouted.count, of: tokens, first: unrouted.first)
        }
    }

    /// The current snapshot, once the runtime is known to be running and `tokens` valid.
    private func begin(tokens: Int) throws(RuntimeError) -> LibrarySnapshot {
        guard !isShutDown.load(ordering: .acquiring) else { throw RuntimeError(.shutDown, "runtime: expected a running runtime, found it shut down") }
        guard tokens >= 0 else { throw RuntimeError(.shape, "apply: expected tokens >= 0, found \(tokens)") }
        return current.withLock { $0 }
    }

    /// Resolves `layer` and checks every buffer's size; returns the module index and the routing buffers' row
    /// stride (entries per token: the slots, or more when the caller's buffers have room for more).
    private func check(_ layer: LayerHandle, in snapshot: LibrarySnapshot, input: UnsafeBufferPointer<Float>, tokens: Int,
                       output: UnsafeMutableBufferPointer<Float>, experts: UnsafeMutableBufferPointer<Int32>?,
                       weights: UnsafeMutableBufferPointer<Float>?, sharedInWidth: Int?) throws(RuntimeError) -> (index: Int, stride: Int) {
        let m = try resolve(layer, in: snapshot)
        let module = snapshot.library.modules[m]
        if let sharedInWidth, module.inWidth != sharedInWidth {
            throw RuntimeError(.shape, "layer \(layer.name): expected the input width \(sharedInWidth) shared by the batch, found \(module.inWidth)")
        }
        guard input.count >= tokens * module.inWidth, tokens == 0 || input.baseAddress != nil else {
            throw RuntimeError(.shape, "layer \(layer.name): expected an input of \(tokens) x \(module.inWidth) floats, found \(input.count)")
        }
        guard output.count >= tokens * module.outWidth, tokens == 0 || output.baseAddress != nil else {
            throw RuntimeError(.shape, "layer \(layer.name): expected an output of \(tokens) x \(module.outWidth) floats, found \(output.count)")
        }
        // The experts read the input while they add into the output: the two must not share memory.
        if tokens > 0, let i = input.baseAddress, let o = output.baseAddress {
            let inputEnd = UnsafeRawPointer(i + tokens * module.inWidth), outputEnd = UnsafeRawPointer(o + tokens * module.outWidth)
            guard UnsafeRawPointer(i) >= outputEnd || UnsafeRawPointer(o) >= inputEnd else {
                throw RuntimeError(.shape, "layer \(layer.name): expected an output that does not overlap the input, found them sharing memory")
            }
        }
        guard (experts == nil) == (weights == nil) else {
            throw RuntimeError(.shape, "layer \(layer.name): expected both routing buffers (experts and weights) or neither")
        }
        let slots = snapshot.routers[m].slots
        guard let experts, let weights, tokens > 0 else { return (m, slots) }
        let stride = experts.count / tokens
        guard experts.count == weights.count, experts.count % tokens == 0, stride >= slots,
              experts.baseAddress != nil, weights.baseAddress != nil else {
            throw RuntimeError(.shape, "layer \(layer.name): expected routing buffers of \(tokens) x \(slots) entries (or \(tokens) rows of more than \(slots)), found \(experts.count) and \(weights.count)")
        }
        return (m, stride)
    }

    /// Admission control: a bounded number of calls may run or wait; the rest fail at once. On success the caller
    /// must decrement `admitted` when done.
    private func admit() throws(RuntimeError) {
        let admittedNow = admitted.add(1, ordering: .sequentiallyConsistent).newValue
        guard admittedNow <= options.maxQueuedCalls else {
            admitted.subtract(1, ordering: .sequentiallyConsistent)
            statistics.withLock { $0.rejected += 1 }
            throw RuntimeError(.overloaded, "runtime: expected at most \(options.maxQueuedCalls) calls queued, found \(admittedNow): call refused")
        }
    }

    /// One layer of a queued call.
    struct QueuedLayer {
        var module: Int
        var out: UnsafeMutablePointer<Float>
        var experts: UnsafeMutablePointer<Int32>?
        var weights: UnsafeMutablePointer<Float>?
        var stride: Int
        /// Tokens of this layer left unrouted so far, and the first of them (call coordinates), or -1.
        var unroutedCount = 0
        var firstUnrouted = -1
    }

    /// A call in the queue: written by its caller before it is queued, then by the lanes that serve it until it is
    /// done.
    ///
    /// # Thread safety
    /// `state` (an atomic) hands the request between its caller and the lanes: the caller writes the request before
    /// queueing it (under the queue's lock) and reads the results only after it sees `state` become done; a lane
    /// writes progress and results only while its dispatch has taken the request (`lane`, set and cleared under the
    /// queue's lock, as are `holdsLane` and `handedLane`). The futex word mirrors `state`
    /// for sleeping. Hence `@unchecked Sendable`.
    final class CallRequest: @unchecked Sendable {
        static let waiting: UInt32 = 0, done: UInt32 = 1, dispatch: UInt32 = 2

        var snapshot: LibrarySnapshot?
        var x: UnsafePointer<Float>?
        var tokens = 0
        var layers = RawBuffer<QueuedLayer>(capacity: 4)
        var layerCount = 0
        /// Tokens served so far (of every layer), and the tokens of the dispatch in flight.
        var served = 0
        var serving = 0
        /// The lane whose dispatch has taken a chunk of this call, or -1 (under the queue's lock).
        var lane = -1
        /// This call's thread holds a lane, and the lane a holder handed it that it has not yet taken up, or -1
        /// (both under the queue's lock).
        var holdsLane = false
        var handedLane = -1
        var failure: RuntimeError?
        var queuedAt: UInt64 = 0
        var firstDispatchAt: UInt64 = 0
        var continuation: CheckedContinuation<Void, Never>?
        let state = Atomic<UInt32>(0)
        let word: UnsafeMutablePointer<UInt32>

        init() {
            word = .allocate(capacity: 1)
            word.initialize(to: 0)
        }

        deinit { word.deallocate() }

        func prepare(snapshot: LibrarySnapshot, x: UnsafePointer<Float>, tokens: Int, layers count: Int) {
            self.snapshot = snapshot
            self.x = x
            self.tokens = tokens
            layerCount = count
            layers.reserve(count)
            served = 0
            serving = 0
            lane = -1
            holdsLane = false
            handedLane = -1
            failure = nil
            queuedAt = 0
            firstDispatchAt = 0
            state.store(Self.waiting, ordering: .sequentiallyConsistent)
            pg_atomic_store_u32(word, Self.waiting)
        }

        func setLayer(_ i: Int, module: Int, out: UnsafeMutablePointer<Float>, experts: UnsafeMutablePointer<Int32>?,
                      weights: UnsafeMutablePointer<Float>?, stride: Int) {
            (layers.pointer + i).initialize(to: QueuedLayer(module: module, out: out, experts: experts, weights: weights, stride: stride))
        }

        /// The first layer (in call order) that left tokens unrouted: its index, how many, and the first token.
        func firstUnroutedLayer() -> (layer: Int, count: Int, first: Int)? {
            for i in 0..<layerCount where layers.pointer[i].unroutedCount > 0 {
                return (i, layers.pointer[i].unroutedCount, layers.pointer[i].firstUnrouted)
            }
            return nil
        }

        /// Sets the state and wakes a sleeping caller (or resumes a suspended task).
        func signal(_ value: UInt32) {
            if value == Self.done, let continuation {
                state.store(value, ordering: .sequentiallyConsistent)
                continuation.resume()
                return
            }
            // The futex word first: once `state` says done, the caller may reuse the request at once (a late wake
            // is then only a spurious one).
            mark(value)
            wake()
        }

        /// Sets the state without waking anyone (the futex word first); ``wake()`` then wakes a sleeper. A wake that
        /// comes late, after the request has moved on, is a spurious one.
        func mark(_ value: UInt32) {
            pg_atomic_store_u32(word, value)
            state.store(value, ordering: .sequentiallyConsistent)
        }

        func wake() { _ = pg_futex_wake(word, 1) }

        /// Sleeps until a lane signals; returns what it signalled.
        func wait() -> UInt32 {
            while true {
                let value = state.load(ordering: .sequentiallyConsistent)
                if value != Self.waiting { return value }
                _ = pg_futex_wait(word, Self.waiting)
            }
        }
    }

    /// The queue of calls not yet done, first come first served, and the dispatch lanes.
    struct CallQueue {
        /// Calls not yet done, in queue order; those in a lane's dispatch have `lane >= 0`.
        var fifo: [CallRequest] = []
        /// Which lanes someone holds (is running or about to run dispatches on), and how many.
        var held: [Bool]
        var active = 0
        var free: [CallRequest] = []

        init(capacity: Int, lanes: Int) {
            fifo.reserveCapacity(capacity)
            free.reserveCapacity(capacity)
            held = [Bool](repeating: false, count: lanes)
        }

        /// Holds the first free lane (lane 0, the one with the workers, first) for `holder`'s thread (nil: a task),
        /// or returns nil when every lane is held.
        mutating func holdLane(for holder: CallRequest?) -> Int? {
            guard let lane = held.firstIndex(of: false) else { return nil }
            held[lane] = true
            active += 1
            holder?.holdsLane = true
            return lane
        }

        mutating func releaseLane(_ lane: Int, holder: CallRequest?) {
            held[lane] = false
            active -= 1
            holder?.holdsLane = false
        }
    }

    /// What only a lane's holder touches: the lane's scheduler and the dispatch's buffers.
    final class Dispatcher {
        let scheduler: LayerScheduler
        var batch: [CallRequest] = []
        /// The calls the last dispatch completed.
        var finished: [CallRequest] = []
        /// The dispatch runs on the holder alone, as another lane is held.
        var alone = false
        let steps = RawBuffer<LayerStep>()
        let tokensPerExpert = RawBuffer<Int>()

        init(scheduler: LayerScheduler, capacity: Int) {
            self.scheduler = scheduler
            batch.reserveCapacity(capacity)
            finished.reserveCapacity(capacity)
        }
    }

    /// Dispatches a holder runs for others after its own call is done, before it hands its lane on: the holder is
    /// running already, while an heir must first be woken and scheduled (on a busy machine, behind other threads).
    /// (Measured on the built-in load test, 2 cores: 0, 4 and 16 alike at 1 client; 4 and 16 ahead of 0 at 8 and
    /// 16 clients.)
    static let extraDispatches = 4

    private func takeRequest() -> CallRequest {
        queue.withLock { $0.free.popLast() } ?? CallRequest()
    }

    private func returnRequest(_ request: CallRequest) {
        request.snapshot = nil
        request.x = nil
        queue.withLock { $0.free.append(request) }
    }

    /// Queues `request` and returns when it has been served: by a dispatch this thread runs (on a lane it finds
    /// free, or one a holder hands it) or by another thread's, while this one sleeps.
    private func serve(_ request: CallRequest) throws {
        if options.observer != nil { request.queuedAt = DispatchTime.now().uptimeNanoseconds }
        var lane = queue.withLock { q -> Int? in
            q.fifo.append(request)
            return q.holdLane(for: request)
        }
        while true {
            if let held = lane { dispatchLoop(own: request, lane: held) }
            let state = request.wait()
            // A lane handed to this thread is taken up even when another lane completed the call meanwhile (its
            // done then overwrote the hand-off signal): nobody else will run it.
            lane = queue.withLock { _ in
                let handed = request.handedLane
                request.handedLane = -1
                return handed >= 0 ? handed : nil
            }
            if lane == nil && state == CallRequest.done { break }
            // Back to waiting, unless the call is done: done is final, so only a dispatch signal is taken back (the
            // futex word too, so a sleeper never misses a done).
            _ = request.state.compareExchange(expected: CallRequest.dispatch, desired: CallRequest.waiting, ordering: .sequentiallyConsistent)
            _ = pg_atomic_cas_u32(request.word, CallRequest.dispatch, CallRequest.waiting)
        }
        if let failure = request.failure { throw failure }
    }

    /// Queues an async `request` whose continuation the dispatch resumes; runs dispatches itself when a lane is
    /// free, and returns at once otherwise.
    private func serveQueued(_ request: CallRequest) {
        if options.observer != nil { request.queuedAt = DispatchTime.now().uptimeNanoseconds }
        let lane = queue.withLock { q -> Int? in
            q.fifo.append(request)
            return q.holdLane(for: nil)
        }
        if let lane { dispatchLoop(own: nil, lane: lane) }
    }

    /// Takes the calls of the next dispatch into `d.batch` (under the queue lock): a chunk of every call no other
    /// lane has taken (all of a small one), in queue order, on the snapshot of the first of them (calls on another
    /// snapshot, after a live change, wait for a later dispatch), while the token budget lasts.
    private func select(_ q: inout CallQueue, into d: Dispatcher, lane: Int) {
        d.batch.removeAll(keepingCapacity: true)
        var unit = 1
        if case let .sequence(length) = routing.granularity { unit = length }
        let chunk = max(unit, options.chunkTokens / unit * unit)
        // Tokens times layers still allowed in this dispatch; once a call does not fit, it and every later call
        // wait for the next dispatch (first come, first served). At least one chunk of the oldest call is taken.
        var budget = options.dispatchTokens ?? Int.max
        var snapshot: LibrarySnapshot? = nil
        for request in q.fifo where request.lane < 0 {
            if snapshot == nil { snapshot = request.snapshot }
            guard request.snapshot === snapshot else { continue }
            var take = min(request.tokens - request.served, chunk)
            if !d.batch.isEmpty {
                let fits = budget / request.layerCount
                if fits < take { take = fits / unit * unit }
                if take == 0 { break }
            }
            budget -= min(budget, take * request.layerCount)
            request.serving = take
            request.lane = lane
            d.batch.append(request)
        }
        d.alone = q.active > 1
    }

    /// Holds lane `lane`: runs dispatches of the calls no other lane has taken until the own request is done, then
    /// hands the lane to the oldest waiting caller that can take it (a thread that sleeps and holds no lane, not a
    /// suspended task), or keeps it while only tasks wait, or gives it up when nothing is left to take. A lane other
    /// than lane 0 that finds itself the only one held moves to lane 0, whose dispatches use the workers.
    private func dispatchLoop(own: CallRequest?, lane first: Int) {
        var lane = first, extra = 0
        while let next = runLane(own: own, lane: lane, extra: &extra) { lane = next }
    }

    private enum LaneStep { case dispatch, leave, move }

    /// Dispatches on `lane` until it is handed on or given up (nil) or the holder moves to lane 0 (0).
    private func runLane(own: CallRequest?, lane: Int, extra: inout Int) -> Int? {
        lanes[lane].withLock { d -> Int? in
            while true {
                var heir: CallRequest? = nil
                let step = queue.withLock { q -> LaneStep in
                    let ownDone = own.map { $0.state.load(ordering: .sequentiallyConsistent) == CallRequest.done } ?? true
                    if ownDone && extra >= Self.extraDispatches,
                       let next = q.fifo.first(where: { $0.lane < 0 && $0.continuation == nil && !$0.holdsLane }) {
                        // Hand over: the heir runs the lane's next dispatch on its own thread. Marked under the lock,
                        // so no other lane can complete the heir's call (and its caller return) before it; woken after.
                        own?.holdsLane = false
                        next.holdsLane = true
                        next.handedLane = lane
                        next.mark(CallRequest.dispatch)
                        heir = next
                        return .leave
                    }
                    if lane != 0 && q.active == 1 && !q.held[0] {
                        q.held[lane] = false
                        q.held[0] = true
                        return .move
                    }
                    select(&q, into: d, lane: lane)
                    if d.batch.isEmpty {
                        q.releaseLane(lane, holder: own)
                        return .leave
                    }
                    if ownDone { extra += 1 }
                    return .dispatch
                }
                switch step {
                case .leave:
                    heir?.wake()
                    return nil
                case .move:
                    return 0
                case .dispatch:
                    break
                }
                runDispatch(d)
                // Done requests leave the queue (their callers are woken after the lock is released); a call that
                // had a chunk served goes to the back, behind the calls that came while its chunk ran, so a long
                // prefill shares the dispatches with what queues behind it instead of taking them all. Which calls
                // are done is settled here: once back in the queue, a call's progress is another lane's to write.
                queue.withLock { q in
                    q.fifo.removeAll { $0.lane == lane }
                    for request in d.batch {
                        request.lane = -1
                        if request.served < request.tokens { q.fifo.append(request) } else { d.finished.append(request) }
                    }
                }
                for request in d.finished {
                    if request === own { request.state.store(CallRequest.done, ordering: .sequentiallyConsistent) } else { request.signal(CallRequest.done) }
                }
                d.finished.removeAll(keepingCapacity: true)
                d.batch.removeAll(keepingCapacity: true)
            }
        }
    }

    /// One dispatch over `d.batch` (`serving` tokens of each call, from `served` on).
    private func runDispatch(_ d: Dispatcher) {
        let observer = options.observer
        guard !isShutDown.load(ordering: .acquiring) else {
            for request in d.batch {
                request.failure = RuntimeError(.shutDown, "runtime: expected a running runtime, found it shut down")
                request.served = request.tokens
                request.serving = 0
            }
            return
        }
        guard let snapshot = d.batch.first?.snapshot else { return }
        var layerTotal = 0
        for request in d.batch { layerTotal += request.layerCount }
        let steps = d.steps.reserve(layerTotal)
        let start = observer == nil ? 0 : DispatchTime.now().uptimeNanoseconds
        var n = 0
        for request in d.batch {
            if request.served == 0 { request.firstDispatchAt = start }
            for l in 0..<request.layerCount {
                let layer = request.layers.pointer[l]
                let module = snapshot.library.modules[layer.module]
                steps[n] = LayerStep(module: layer.module, x: request.x! + request.served * module.inWidth, tokens: request.serving,
                                     out: layer.out + request.served * module.outWidth,
                                     expertsOut: layer.experts.map { $0 + request.served * layer.stride },
                                     weightsOut: layer.weights.map { $0 + request.served * layer.stride }, routingStride: layer.stride)
                n += 1
            }
        }
        let experts = snapshot.library.experts.count
        let counts = d.tokensPerExpert.reserve(experts)
        for e in 0..<experts { counts[e] = 0 }
        d.scheduler.execute(snapshot, steps: steps, count: n, tokensPerExpert: counts, alone: d.alone)
        // Results back to the requests, in the order their steps were made.
        var i = 0
        var completedCalls = 0, completedTokens = 0, merged = 0
        let calls = d.batch.count
        let end = observer == nil ? 0 : DispatchTime.now().uptimeNanoseconds
        for request in d.batch {
            for l in 0..<request.layerCount {
                let step = steps[i]
                i += 1
                if step.unroutedCount > 0 {
                    if request.layers.pointer[l].firstUnrouted < 0 { request.layers.pointer[l].firstUnrouted = request.served + step.firstUnrouted }
                    request.layers.pointer[l].unroutedCount += step.unroutedCount
                }
            }
            if request.served == 0 && calls > 1 { merged += 1 }
            request.served += request.serving
            request.serving = 0
            guard request.served == request.tokens else { continue }
            completedCalls += request.layerCount
            completedTokens += request.tokens * request.layerCount
            if let observer {
                let worker = d.scheduler.workerBase
                observer.observe(RuntimeEvent(kind: .queued, worker: worker, node: d.scheduler.nodes[0], layer: request.layers.pointer[0].module,
                                              expert: -1, rows: request.tokens, start: request.queuedAt, end: request.firstDispatchAt))
                for l in 0..<request.layerCount {
                    observer.observe(RuntimeEvent(kind: .call, worker: worker, node: d.scheduler.nodes[0], layer: request.layers.pointer[l].module,
                                                  expert: -1, rows: request.tokens, start: request.firstDispatchAt, end: end))
                }
            }
        }
        let alone = d.alone
        statistics.withLock { stats in
            stats.calls += completedCalls
            stats.tokens += completedTokens
            stats.mergedCalls += merged
            stats.dispatches += 1
            if alone { stats.concurrentDispatches += 1 }
            for e in 0..<min(experts, stats.tokensPerExpert.count) { stats.tokensPerExpert[e] += counts[e] }
        }
    }

    /// The array form: returns the delta (not added to anything) and each token's choices. Throws as the buffer form
    /// does; when tokens are left unrouted (``RuntimeError/Code/nonFiniteInput``) the other tokens' results are lost
    /// with the arrays, so callers that want them use the buffer form.
    public func apply(_ layer: LayerHandle, input: [Float], tokens: Int) throws -> LayerOutput {
        let (_, outWidth) = try widths(of: layer)
        let slots = try self.slots(of: layer)
        var delta = [Float](repeating: 0, count: tokens * outWidth)
        var experts = [Int32](repeating: -1, count: tokens * slots)
        var weights = [Float](repeating: 0, count: tokens * slots)
        try input.withUnsafeBufferPointer { x in
            try delta.withUnsafeMutableBufferPointer { out in
                try experts.withUnsafeMutableBufferPointer { e in
                    try weights.withUnsafeMutableBufferPointer { w in
                        try apply(layer, input: x, tokens: tokens, output: out, experts: e, weights: w)
                    }
                }
            }
        }
        return LayerOutput(delta: delta, experts: experts, weights: weights, slots: slots)
    }

    /// The async form, for Swift concurrency: the call queues like any other and the task suspends until a
    /// dispatch has served it, so no thread is parked for it (when a lane is free, the task holds it and runs its
    /// dispatches on its own thread until nothing is left to take or a sleeping thread caller can take the lane
    /// over: while only tasks call, the task that holds a lane keeps serving the others' calls before it returns). (A distinct name, so synchronous callers in async contexts are not forced to await.)
    public func applyAsync(_ layer: LayerHandle, input: [Float], tokens: Int) async throws -> LayerOutput {
        let snapshot = try begin(tokens: tokens)
        let m = try resolve(layer, in: snapshot)
        let module = snapshot.library.modules[m]
        let slots = snapshot.routers[m].slots
        guard input.count >= tokens * module.inWidth else {
            throw RuntimeError(.shape, "layer \(layer.name): expected an input of \(tokens) x \(module.inWidth) floats, found \(input.count)")
        }
        guard tokens > 0 else { return LayerOutput(delta: [], experts: [], weights: [], slots: slots) }
        try admit()
        defer { admitted.subtract(1, ordering: .sequentiallyConsistent) }
        // Buffers that stay put across the suspension.
        let x = UnsafeMutableBufferPointer<Float>.allocate(capacity: tokens * module.inWidth)
        let out = UnsafeMutableBufferPointer<Float>.allocate(capacity: tokens * module.outWidth)
        let experts = UnsafeMutableBufferPointer<Int32>.allocate(capacity: tokens * slots)
        let weights = UnsafeMutableBufferPointer<Float>.allocate(capacity: tokens * slots)
        defer { x.deallocate(); out.deallocate(); experts.deallocate(); weights.deallocate() }
        _ = x.initialize(from: input.prefix(tokens * module.inWidth))
        out.initialize(repeating: 0)
        experts.initialize(repeating: -1)
        weights.initialize(repeating: 0)
        let request = takeRequest()
        defer { returnRequest(request) }
        request.prepare(snapshot: snapshot, x: UnsafePointer(x.baseAddress!), tokens: tokens, layers: 1)
        request.setLayer(0, module: m, out: out.baseAddress!, experts: experts.baseAddress, weights: weights.baseAddress, stride: slots)
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            request.continuation = continuation
            serveQueued(request)
        }
        request.continuation = nil
        if let failure = request.failure { throw failure }
        if let unrouted = request.firstUnroutedLayer() { throw Self.nonFiniteInput(layer, count: unrouted.count, of: tokens, first: unrouted.first) }
        return LayerOutput(delta: Array(out), experts: Array(experts), weights: Array(weights), slots: slots)
    }

    /// Calls queued now: waiting for a dispatch, or in one running.
    public var queuedCalls: Int { queue.withLock { $0.fifo.count } }

    /// Lanes someone holds now (0 once every call has returned); for tests.
    var heldLanes: Int { queue.withLock { $0.active } }

    /// Counters since start.
    public func statisticsSnapshot() -> RuntimeStatistics { statistics.withLock { $0 } }

    /// Bytes of expert weights really held (copies included): the current snapshot's, plus those only older snapshots
    /// still serving calls hold (memory shared between snapshots counts once).
    public var residentBytes: Int { current.withLock { $0 }.ledger.bytes }

    /// The snapshot later calls start on.
    var currentSnapshot: LibrarySnapshot { current.withLock { $0 } }

    /// Where each node's shard memory really is, as the kernel reports it (move_pages), next to where it was meant to be.
    public func placementReport() -> [(node: Int, memoryNode: Int, bytes: Int, experts: [String], pagesByNode: [Int: Int])] {
        let snapshot = current.withLock { $0 }
        return snapshot.arenas.map { arena in
            let experts = snapshot.placement.nodes.indices.filter { snapshot.placement.nodes[$0].contains(arena.node) && !snapshot.retired.contains(ExpertIndex($0)) }
                .map { snapshot.library.experts[$0].name }
            return (arena.node, arena.memoryNode, arena.byteCount, experts, arena.pageNodes())
        }
    }

    /// Adds the expert in `directory` (PEFT layout) under `name`, with the next expert index; calls in flight are
    /// unaffected, later calls see it. Fails, changing nothing, if the expert is invalid, disagrees with a module's
    /// widths, has a name in use, or would exceed the memory cap.
    @discardableResult
    public func addExpert(directory: String, name: String) throws -> ExpertIndex {
        try changes.withLock { generation in
            let old = current.withLock { $0 }
            guard !old.library.experts.enumerated().contains(where: { $0.element.name == name && !old.retired.contains(ExpertIndex($0.offset)) }) else {
                throw RuntimeError(.library, "expert \"\(name)\": expected a new name, found one already served")
            }
            let index = ExpertIndex(old.library.experts.count)
            let (info, pieces) = try ExpertLibrary.loadExpert(directory: directory, name: name, index: index)
            var modules = old.library.modules
            var changed = Set<String>()
            for (moduleName, piece) in pieces {
                if let m = old.library.moduleIndex(of: moduleName) {
                    let module = modules[m]
                    guard module.inWidth == piece.a.shape[1], module.outWidth == piece.bTransposed.shape[1] else {
                        throw RuntimeError(.library, "expert \"\(name)\", module \(moduleName): expected in \(module.inWidth), out \(module.outWidth), found in \(piece.a.shape[1]), out \(piece.bTransposed.shape[1])")
                    }
                    modules[m] = RoutedModule(name: moduleName, inWidth: module.inWidth, outWidth: module.outWidth, experts: module.experts + [piece])
                } else {
                    modules.append(RoutedModule(name: moduleName, inWidth: piece.a.shape[1], outWidth: piece.bTransposed.shape[1], experts: [piece]))
                }
                changed.insert(moduleName)
            }
            let library = ExpertLibrary(source: old.library.source, experts: old.library.experts + [info], modules: modules, routing: old.library.routing)
            try publish(library, retired: old.retired, changed: changed, old: old, generation: &generation)
            statistics.withLock { $0.tokensPerExpert.append(0) }
            return index
        }
    }

    /// Removes the expert named `name`: later calls no longer route to it (its index stays reserved); calls in
    /// flight finish with it. A module left without candidates disappears, and its handles then fail with `.notFound`.
    public func removeExpert(named name: String) throws {
        try changes.withLock { generation in
            let old = current.withLock { $0 }
            guard let e = old.library.experts.indices.first(where: { old.library.experts[$0].name == name && !old.retired.contains(ExpertIndex($0)) }) else {
                throw RuntimeError(.notFound, "expert \"\(name)\": expected an expert being served, found none of that name")
            }
            let expert = ExpertIndex(e)
            var changed = Set<String>()
            var modules: [RoutedModule] = []
            for module in old.library.modules {
                guard module.experts.contains(where: { $0.expert == expert }) else { modules.append(module); continue }
                changed.insert(module.name)
                let remaining = module.experts.filter { $0.expert != expert }
                if !remaining.isEmpty {
                    modules.append(RoutedModule(name: module.name, inWidth: module.inWidth, outWidth: module.outWidth, experts: remaining))
                }
            }
            let library = ExpertLibrary(source: old.library.source, experts: old.library.experts, modules: modules, routing: old.library.routing)
            try publish(library, retired: old.retired.union([expert]), changed: changed, old: old, generation: &generation)
        }
    }

    private func publish(_ library: ExpertLibrary, retired: Set<ExpertIndex>, changed: Set<String>, old: LibrarySnapshot, generation: inout Int) throws {
        generation += 1
        var reuse: [String: LayerRouter] = [:]
        for (m, module) in old.library.modules.enumerated() where !changed.contains(module.name) { reuse[module.name] = old.routers[m] }
        var load = options.loadProfile
        if let profile = load, profile.count < library.experts.count { load = profile + [Double](repeating: 0, count: library.experts.count - profile.count) }
        let snapshot = try LibrarySnapshot.build(id: generation, library: library, retired: retired, options: routing, topology: topology,
                                                 policy: options.placement, load: load, memoryCap: options.memoryCapBytes, reuse: reuse,
                                                 previous: old)
        current.withLock { $0 = snapshot }
    }

    /// Stops the workers. Calls in progress finish; later calls fail with `.shutDown`. Idempotent.
    public func shutdown() {
        guard !isShutDown.exchange(true, ordering: .sequentiallyConsistent) else { return }
        // Waits for lane 0's dispatch in flight (the only one using the workers); every later dispatch fails.
        lanes[0].withLock { _ in executor.shutdown() }
    }
}
