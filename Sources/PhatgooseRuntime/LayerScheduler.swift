import CPhatgooseSystem
import PhatgooseKernels
import PhatgooseLibrary
import PhatgooseRouting

/// A unit of work: one candidate's LoRA over a tile of its gathered tokens.
struct WorkItem {
    var candidate: Int32
    var begin: Int32
    var count: Int32
    var owner: Int32
}

/// A growable raw buffer of trivial values, reused across calls (no allocation once it has held the largest call).
/// Storage starts on a 64-byte boundary, like ``ScratchBuffer``'s, so rows of a multiple of 16 floats never split a
/// cache line in the kernels' 64-byte loads.
final class RawBuffer<T> {
    private(set) var pointer: UnsafeMutablePointer<T>
    private(set) var capacity: Int

    init(capacity: Int = 16) {
        self.capacity = max(capacity, 16)
        pointer = ScratchBuffer.allocateAligned(T.self, capacity: self.capacity)
    }

    @discardableResult
    func reserve(_ count: Int) -> UnsafeMutablePointer<T> {
        if count > capacity {
            UnsafeMutableRawPointer(pointer).deallocate()
            capacity = max(count, capacity * 2)
            pointer = ScratchBuffer.allocateAligned(T.self, capacity: capacity)
        }
        return pointer
    }

    deinit { UnsafeMutableRawPointer(pointer).deallocate() }
}

/// Turns one call into parallel phases on the executor: routing split by tokens, the dispatch plan, work items
/// (expert, token tile) queued to the participants on the expert's node, balanced longest-first, with idle
/// participants stealing within their node, then the combine split by tokens.
///
/// Results equal the single-threaded `LayerExecutor`'s bit for bit: every routed row, every assignment row and every
/// token's combine is computed by the same kernels in the same order whatever the split (the kernels are
/// tiling-invariant).
///
/// The scheduler is itself the ``ParallelJob`` the executor runs: the state of the phase in flight lives in its
/// `call` field, so publishing a phase allocates nothing.
///
/// # Thread safety
/// Owned by the runtime's execution lock: one call at a time uses it. The caller writes `call` and the buffers
/// before publishing a phase; during a phase the participants only read `call` and touch disjoint parts of the
/// buffers (their own scratch, their own token ranges, rows of the items they claimed through the atomic cursors).
/// Hence `@unchecked Sendable`.
final class LayerScheduler: ParallelJob, @unchecked Sendable {
    enum Phase {
        case route
        case score
        case experts
        case combine
    }

    /// Everything a phase needs, set by the caller before it publishes the phase.
    struct CallState {
        var phase = Phase.route
        var snapshot: LibrarySnapshot?
        var module = 0
        var x: UnsafePointer<Float>?
        var out: UnsafeMutablePointer<Float>?
        var tokens = 0
        var slots = 0
        var inWidth = 0
        var outWidth = 0
        var unit = 1
        var units = 0
        var activeParticipants = 0
        var candidatesOut: UnsafeMutablePointer<Int32>?
        var weightsAll: UnsafeMutablePointer<Float>?
        var prepared: UnsafePointer<Float>?
        var preparedLD = 0
        var preparedRows = 0
        var scores: UnsafeMutablePointer<Float>?
        var tokenList: UnsafePointer<Int32>?
        var weightList: UnsafePointer<Float>?
        var rows: UnsafeMutablePointer<Float>?
        /// The experts run one after another on the caller, in expert order, and add straight into `out` (no
        /// per-assignment rows, no combine phase).
        var fused = false
        /// Participants of this call: the pool's, or 1 (the caller alone) for a call below `parallelMinTokens`.
        var team = 1
    }

    let executor: any ParallelExecutor
    /// The executor's participants (the caller and its workers).
    let poolSize: Int
    let nodes: [Int]
    var tileRows: Int?
    /// Calls of fewer tokens run on the caller alone.
    var parallelMinTokens = 1
    var observer: (any RuntimeObserver)?

    private var call = CallState()
    private let chosen = RawBuffer<Int32>()
    private let chosenWeights = RawBuffer<Float>()
    private var plan = DispatchPlan()
    private let rows = RawBuffer<Float>()
    private let items = RawBuffer<WorkItem>()
    private let sortedItems = RawBuffer<WorkItem>()
    private let queueStart = RawBuffer<Int>()
    private let cursors = RawBuffer<Int64>()
    private let ownerLoad = RawBuffer<Int>()
    /// Per-candidate assignment counts of the last call.
    let counts = RawBuffer<Int>()
    private let routeScratch: [RawBuffer<Float>]
    private let shrinkScratch: [RawBuffer<Float>]

    init(executor: any ParallelExecutor) {
        self.executor = executor
        poolSize = executor.participantCount
        nodes = executor.participantNodes
        routeScratch = (0..<poolSize).map { _ in RawBuffer<Float>() }
        shrinkScratch = (0..<poolSize).map { _ in RawBuffer<Float>() }
    }

    /// The participants of the call in flight (every phase splits its work among these).
    private var participants: Int { call.team }

    @inline(__always)
    private func now() -> UInt64 { observer == nil ? 0 : pg_now_ns() }

    /// Runs `phase` on every participant (or only on the caller when `parallel` is false).
    private func runPhase(_ phase: Phase, parallel: Bool) {
        call.phase = phase
        if parallel && participants > 1 { executor.run(self) } else { run(participant: 0) }
    }

    /// One participant's share of the phase in flight.
    func run(participant p: Int) {
        switch call.phase {
        case .route: routeShare(p)
        case .score: scoreShare(p)
        case .experts: expertShare(p)
        case .combine: combineShare(p)
        }
    }

    /// Applies module `m` of `snapshot` to `tokens` rows of `x`, adding into `out`. Fills `expertsOut`/`weightsOut`
    /// ([tokens, routingStride], routingStride >= slots; slots beyond the module's hold expert -1 and weight 0) when
    /// given, and per-candidate assignment counts into `counts`. Returns the tokens left unrouted (NaN or infinite
    /// input; see ``RoutingResult``): how many, and the first.
    func execute(_ snapshot: LibrarySnapshot, module m: Int, x: UnsafePointer<Float>, tokens: Int,
                 out: UnsafeMutablePointer<Float>, expertsOut: UnsafeMutablePointer<Int32>?, weightsOut: UnsafeMutablePointer<Float>?,
                 routingStride: Int, counts: UnsafeMutablePointer<Int>?) -> (count: Int, first: Int?) {
        let module = snapshot.library.modules[m]
        let router = snapshot.routers[m]
        call = CallState()
        call.team = tokens >= parallelMinTokens ? poolSize : 1
        call.snapshot = snapshot
        call.module = m
        call.x = x
        call.out = out
        call.tokens = tokens
        call.slots = router.slots
        call.inWidth = module.inWidth
        call.outWidth = module.outWidth
        call.candidatesOut = chosen.reserve(tokens * router.slots)
        call.weightsAll = chosenWeights.reserve(tokens * router.slots)

        // Phase A: routing. With enough routed rows, participants split the rows (whole sequences when routing per
        // sequence); with few rows (decode), the caller prepares them, participants split the candidates' scores
        // (each reads only its part of the gate matrix), and the caller selects.
        if case let .sequence(length) = router.options.granularity { call.unit = min(length, tokens) } else { call.unit = 1 }
        call.units = (tokens + call.unit - 1) / call.unit
        if router.options.router == .uniform {
            router.select(routeScratch[0].reserve(1), rows: 0, tokens: tokens, candidates: call.candidatesOut!, weights: call.weightsAll!)
            router.unrouteNonFiniteRows(x, ldx: module.inWidth, tokens: tokens, candidates: call.candidatesOut!, weights: call.weightsAll!)
        } else if call.units >= participants * 2 || participants == 1 {
            call.activeParticipants = min(participants, call.units)
            for p in 0..<call.activeParticipants {
                routeScratch[p].reserve(router.scratchCount(tokens: (call.units / call.activeParticipants + 1) * call.unit))
            }
            runPhase(.route, parallel: call.activeParticipants > 1)
        } else {
            let scratch = routeScratch[0].reserve(router.scratchCount(tokens: tokens))
            let start = now()
            let prepared = router.prepare(x, ldx: module.inWidth, tokens: tokens, scratch: scratch)
            call.prepared = prepared.rows
            call.preparedLD = prepared.ld
            call.preparedRows = prepared.count
            call.scores = router.scoresPointer(scratch, tokens: tokens)
            runPhase(.score, parallel: true)
            router.select(call.scores!, rows: prepared.count, tokens: tokens, candidates: call.candidatesOut!, weights: call.weightsAll!)
            if let observer {
                observer.observe(RuntimeEvent(kind: .routing, worker: 0, node: nodes[0], layer: m, expert: -1, rows: tokens, start: start, end: pg_now_ns()))
            }
        }

        let unrouted = LayerRouter.unroutedTokens(call.candidatesOut!, tokens: tokens, slots: call.slots)

        // The plan, on the caller.
        let planStart = now()
        plan.build(tokens: tokens, slots: call.slots, chosen: call.candidatesOut!, weights: call.weightsAll!, candidates: module.experts.count)
        let assignments = plan.assignmentCount
        if let observer {
            observer.observe(RuntimeEvent(kind: .plan, worker: 0, node: nodes[0], layer: m, expert: -1, rows: assignments, start: planStart, end: pg_now_ns()))
        }
        if let counts {
            for c in 0..<module.experts.count { counts[c] = plan.range(of: c).count }
        }

        // Work items: tiles of each candidate's tokens, so a popular expert cannot serialise the layer.
        let tile = max(1, tileRows ?? min(256, max(16, (assignments + participants * 4 - 1) / (participants * 4))))
        var itemCount = 0
        for c in 0..<module.experts.count { itemCount += (plan.range(of: c).count + tile - 1) / tile }
        let itemList = items.reserve(itemCount)
        let sorted = sortedItems.reserve(itemCount)
        let load = ownerLoad.reserve(participants)
        let starts = queueStart.reserve(participants + 1)
        let cursor = cursors.reserve(participants)
        for p in 0..<participants { load[p] = 0 }
        var n = 0
        for c in 0..<module.experts.count {
            let range = plan.range(of: c)
            var begin = range.lowerBound
            while begin < range.upperBound {
                let count = min(tile, range.upperBound - begin)
                itemList[n] = WorkItem(candidate: Int32(c), begin: Int32(begin), count: Int32(count), owner: 0)
                n += 1
                begin += count
            }
        }
        // Owners: the least-loaded participant on a node holding the candidate (any participant when no participant
        // sits on such a node).
        // The holders' nodes come from the plain per-module table (indexing `copies` would copy its arrays).
        snapshot.pieceViews[m].withUnsafeBufferPointer { views in
            snapshot.pieceStarts[m].withUnsafeBufferPointer { pieceStarts in
                for i in 0..<itemCount {
                    let c = Int(itemList[i].candidate)
                    let holders = Int(pieceStarts[c])..<Int(pieceStarts[c + 1])
                    var best = -1
                    for p in 0..<participants where (best < 0 || load[p] < load[best])
                        && holders.contains(where: { views[$0].node == Int32(nodes[p]) }) { best = p }
                    if best < 0 { for p in 0..<participants where best < 0 || load[p] < load[best] { best = p } }
                    itemList[i].owner = Int32(best)
                    load[best] += Int(itemList[i].count)
                }
            }
        }
        // Counting sort by owner into per-participant queues.
        for p in 0...participants { starts[p] = 0 }
        for i in 0..<itemCount { starts[Int(itemList[i].owner) + 1] += 1 }
        for p in 0..<participants { starts[p + 1] += starts[p] }
        for p in 0..<participants { cursor[p] = Int64(starts[p]) }
        for i in 0..<itemCount {
            let owner = Int(itemList[i].owner)
            sorted[Int(cursor[owner])] = itemList[i]
            cursor[owner] += 1
        }
        for p in 0..<participants { cursor[p] = Int64(starts[p]) }

        // Phase B: experts. When they all run on the caller (one participant, or one work item), in the queue's
        // order, which is then expert order, they add straight into `out`: the bits of the combine below, which adds
        // each token's rows in expert order, without the per-assignment rows.
        call.fused = participants == 1 || itemCount <= 1
        if !call.fused { call.rows = rows.reserve(assignments * module.outWidth) }
        let maxRank = snapshot.maxRank  // not module.experts.reduce: that copies every ModuleExpert (reference counting)
        for p in 0..<participants { shrinkScratch[p].reserve(tile * maxRank) }
        plan.tokens.withUnsafeBufferPointer { planTokens in
            plan.weights.withUnsafeBufferPointer { planWeights in
                call.tokenList = planTokens.baseAddress
                call.weightList = planWeights.baseAddress
                if itemCount > 0 { runPhase(.experts, parallel: itemCount > 1) }
                call.tokenList = nil
                call.weightList = nil
            }
        }

        // Phase C: combine, split by tokens.
        if !call.fused {
            call.activeParticipants = min(participants, max(1, tokens / 8))
            runPhase(.combine, parallel: call.activeParticipants > 1)
        }

        if let expertsOut, let weightsOut {
            let slots = call.slots
            snapshot.candidateExperts[m].withUnsafeBufferPointer { experts in
                for t in 0..<tokens {
                    for j in 0..<slots {
                        let c = call.candidatesOut![t * slots + j]
                        expertsOut[t * routingStride + j] = c < 0 ? -1 : experts[Int(c)]
                        weightsOut[t * routingStride + j] = call.weightsAll![t * slots + j]
                    }
                    for j in slots..<routingStride {
                        expertsOut[t * routingStride + j] = -1
                        weightsOut[t * routingStride + j] = 0
                    }
                }
            }
        }
        call = CallState()
        return unrouted
    }

    private func routeShare(_ p: Int) {
        guard p < call.activeParticipants, let snapshot = call.snapshot else { return }
        let router = snapshot.routers[call.module]
        let units = call.units, unit = call.unit, tokens = call.tokens, active = call.activeParticipants
        let t0 = min(tokens, units * p / active * unit), t1 = min(tokens, units * (p + 1) / active * unit)
        guard t1 > t0 else { return }
        let start = now()
        router.route(call.x! + t0 * call.inWidth, ldx: call.inWidth, tokens: t1 - t0, scratch: routeScratch[p].pointer,
                     candidates: call.candidatesOut! + t0 * call.slots, weights: call.weightsAll! + t0 * call.slots)
        if let observer {
            observer.observe(RuntimeEvent(kind: .routing, worker: p, node: nodes[p], layer: call.module, expert: -1, rows: t1 - t0, start: start, end: pg_now_ns()))
        }
    }

    private func scoreShare(_ p: Int) {
        guard let snapshot = call.snapshot else { return }
        let router = snapshot.routers[call.module]
        router.score(call.prepared!, ld: call.preparedLD, rows: call.preparedRows, columns: router.scoreColumns(part: p, of: participants),
                     into: call.scores!)
    }

    private func expertShare(_ p: Int) {
        guard let snapshot = call.snapshot, let tokenList = call.tokenList, let weightList = call.weightList else { return }
        snapshot.pieceViews[call.module].withUnsafeBufferPointer { views in
            snapshot.pieceStarts[call.module].withUnsafeBufferPointer { pieceStarts in
                runItems(p, views: views, pieceStarts: pieceStarts, tokenList: tokenList, weightList: weightList)
            }
        }
    }

    /// Participant p's work items, then stolen ones; `views`/`pieceStarts` as in ``LibrarySnapshot/pieceViews``.
    private func runItems(_ p: Int, views: UnsafeBufferPointer<(node: Int32, view: ExpertKernelView)>, pieceStarts: UnsafeBufferPointer<Int32>,
                          tokenList: UnsafePointer<Int32>, weightList: UnsafePointer<Float>) {
        let h = shrinkScratch[p].pointer
        let myNode = nodes[p]
        let sorted = sortedItems.pointer, starts = queueStart.pointer, cursor = cursors.pointer
        let inWidth = call.inWidth, outWidth = call.outWidth
        // Own queue first, then steal from participants of the same node; when fused, the caller alone runs the
        // phase and so takes every queue (a single item may be queued to a participant on another node).
        for offset in 0..<participants {
            let q = (p + offset) % participants
            if offset > 0 && nodes[q] != myNode && !call.fused { continue }
            let end = Int64(starts[q + 1])
            while true {
                let i = pg_atomic_fetch_add_i64(cursor + q, 1)
                if i >= end { break }
                let item = sorted[Int(i)]
                let start = now()
                // The copy on this participant's node, else the primary.
                let first = Int(pieceStarts[Int(item.candidate)]), last = Int(pieceStarts[Int(item.candidate) + 1])
                var chosen = first
                for j in first..<last where views[j].node == Int32(myNode) { chosen = j; break }
                let piece = views[chosen].view
                let begin = Int(item.begin), count = Int(item.count)
                if call.fused {
                    LayerExecutor.runExpertAdding(piece, x: call.x!, ldx: inWidth, inWidth: inWidth, outWidth: outWidth,
                                                  tokens: tokenList + begin, weights: weightList + begin, count: count,
                                                  h: h, out: call.out!, ldo: outWidth)
                } else {
                    LayerExecutor.runExpert(piece, x: call.x!, ldx: inWidth, inWidth: inWidth, outWidth: outWidth,
                                            tokens: tokenList + begin, weights: weightList + begin, count: count,
                                            h: h, rows: call.rows! + begin * outWidth)
                }
                if let observer {
                    observer.observe(RuntimeEvent(kind: offset == 0 ? .item : .steal, worker: p, node: myNode, layer: call.module,
                                                  expert: piece.expert, rows: count, start: start, end: pg_now_ns()))
                }
            }
        }
    }

    private func combineShare(_ p: Int) {
        guard p < call.activeParticipants else { return }
        let tokens = call.tokens, active = call.activeParticipants
        let t0 = tokens * p / active, t1 = tokens * (p + 1) / active
        guard t1 > t0 else { return }
        let start = now()
        LayerExecutor.combine(plan, rows: call.rows!, outWidth: call.outWidth, tokenRange: t0..<t1, out: call.out!, ldo: call.outWidth)
        if let observer {
            observer.observe(RuntimeEvent(kind: .combine, worker: p, node: nodes[p], layer: call.module, expert: -1, rows: t1 - t0, start: start, end: pg_now_ns()))
        }
    }
}
