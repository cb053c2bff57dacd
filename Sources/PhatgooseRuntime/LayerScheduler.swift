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
final class RawBuffer<T> {
    private(set) var pointer: UnsafeMutablePointer<T>
    private(set) var capacity: Int

    init(capacity: Int = 16) {
        self.capacity = max(capacity, 16)
        pointer = .allocate(capacity: self.capacity)
    }

    @discardableResult
    func reserve(_ count: Int) -> UnsafeMutablePointer<T> {
        if count > capacity {
            pointer.deallocate()
            capacity = max(count, capacity * 2)
            pointer = .allocate(capacity: capacity)
        }
        return pointer
    }

    deinit { pointer.deallocate() }
}

/// Turns one call into parallel phases on the executor: routing split by tokens, the dispatch plan, work items
/// (expert, token tile) queued to the participants on the expert's node, balanced longest-first, with idle
/// participants stealing within their node, then the combine split by tokens.
///
/// Results equal the single-threaded `LayerExecutor`'s bit for bit: every routed row, every assignment row and every
/// token's combine is computed by the same kernels in the same order whatever the split (the kernels are
/// tiling-invariant).
///
/// # Thread safety
/// Owned by the runtime's execution lock: one call at a time uses it, and during that call the participants touch
/// only disjoint parts of its buffers (their own scratch, their own token ranges, rows of the items they claimed
/// through the atomic cursors). Hence `@unchecked Sendable`.
final class LayerScheduler: @unchecked Sendable {
    let executor: any ParallelExecutor
    let participants: Int
    let nodes: [Int]
    var tileRows: Int?
    var observer: (any RuntimeObserver)?

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
        participants = executor.participantCount
        nodes = executor.participantNodes
        routeScratch = (0..<participants).map { _ in RawBuffer<Float>() }
        shrinkScratch = (0..<participants).map { _ in RawBuffer<Float>() }
    }

    @inline(__always)
    private func now() -> UInt64 { observer == nil ? 0 : pg_now_ns() }

    /// Applies module `m` of `snapshot` to `tokens` rows of `x`, adding into `out`. Fills `expertsOut`/`weightsOut`
    /// ([tokens * slots]) when given. Returns per-candidate token counts through `counts` when given.
    func execute(_ snapshot: LibrarySnapshot, module m: Int, x: UnsafePointer<Float>, tokens: Int,
                 out: UnsafeMutablePointer<Float>, expertsOut: UnsafeMutablePointer<Int32>?, weightsOut: UnsafeMutablePointer<Float>?,
                 counts: UnsafeMutablePointer<Int>?) {
        let module = snapshot.library.modules[m]
        let router = snapshot.routers[m]
        let inWidth = module.inWidth, outWidth = module.outWidth
        let slots = router.slots
        let candidatesOut = chosen.reserve(tokens * slots)
        let weightsAll = chosenWeights.reserve(tokens * slots)
        let observer = self.observer

        // Phase A: routing. With enough routed rows, participants split the rows (whole sequences when routing per
        // sequence); with few rows (decode), the caller prepares them, participants split the candidates' scores
        // (each reads only its part of the gate matrix), and the caller selects.
        let unit: Int
        if case let .sequence(length) = router.options.granularity { unit = min(length, tokens) } else { unit = 1 }
        let units = (tokens + unit - 1) / unit
        if router.options.router == .uniform {
            router.select(routeScratch[0].reserve(1), rows: 0, tokens: tokens, candidates: candidatesOut, weights: weightsAll)
        } else if units >= participants * 2 || participants == 1 {
            let routingParticipants = min(participants, units)
            for p in 0..<routingParticipants { routeScratch[p].reserve(router.scratchCount(tokens: (units / routingParticipants + 1) * unit)) }
            func routePhase(_ p: Int) {
                guard p < routingParticipants else { return }
                let t0 = min(tokens, units * p / routingParticipants * unit), t1 = min(tokens, units * (p + 1) / routingParticipants * unit)
                guard t1 > t0 else { return }
                let start = self.now()
                router.route(x + t0 * inWidth, ldx: inWidth, tokens: t1 - t0, scratch: self.routeScratch[p].pointer,
                             candidates: candidatesOut + t0 * slots, weights: weightsAll + t0 * slots)
                if let observer {
                    observer.observe(RuntimeEvent(kind: .routing, worker: p, node: self.nodes[p], layer: m, expert: -1, rows: t1 - t0, start: start, end: pg_now_ns()))
                }
            }
            if routingParticipants > 1 { executor.run(routePhase) } else { routePhase(0) }
        } else {
            let scratch = routeScratch[0].reserve(router.scratchCount(tokens: tokens))
            let start = now()
            let prepared = router.prepare(x, ldx: inWidth, tokens: tokens, scratch: scratch)
            let scores = router.scoresPointer(scratch, tokens: tokens)
            let n = router.candidateCount
            executor.run { p in
                let c0 = n * p / self.participants, c1 = n * (p + 1) / self.participants
                router.score(prepared.rows, ld: prepared.ld, rows: prepared.count, columns: c0..<c1, into: scores)
            }
            router.select(scores, rows: prepared.count, tokens: tokens, candidates: candidatesOut, weights: weightsAll)
            if let observer {
                observer.observe(RuntimeEvent(kind: .routing, worker: 0, node: nodes[0], layer: m, expert: -1, rows: tokens, start: start, end: pg_now_ns()))
            }
        }

        // The plan, on the caller.
        let planStart = now()
        plan.build(tokens: tokens, slots: slots, chosen: candidatesOut, weights: weightsAll, candidates: module.experts.count)
        let assignments = plan.assignmentCount
        if let observer {
            observer.observe(RuntimeEvent(kind: .plan, worker: 0, node: nodes[0], layer: m, expert: -1, rows: assignments, start: planStart, end: pg_now_ns()))
        }
        if let counts {
            for c in 0..<module.experts.count { counts[c] = plan.range(of: c).count }
        }
        let rowBuffer = rows.reserve(assignments * outWidth)

        // Work items: tiles of each candidate's tokens, so a popular expert cannot serialise the layer.
        let tile = max(1, tileRows ?? min(256, max(16, (assignments + participants * 4 - 1) / (participants * 4))))
        var itemCount = 0
        for c in 0..<module.experts.count {
            let range = plan.range(of: c)
            itemCount += (range.count + tile - 1) / tile
        }
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
        // sits on such a node). Items come in candidate order, largest tiles first within a candidate, which is close
        // to longest-first because tiles are equal-sized.
        let copies = snapshot.copies[m]
        for i in 0..<itemCount {
            let holders = copies[Int(itemList[i].candidate)].nodes
            var best = -1
            for p in 0..<participants where holders.contains(nodes[p]) && (best < 0 || load[p] < load[best]) { best = p }
            if best < 0 { for p in 0..<participants where best < 0 || load[p] < load[best] { best = p } }
            itemList[i].owner = Int32(best)
            load[best] += Int(itemList[i].count)
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

        // Phase B: experts.
        let maxRank = module.experts.reduce(0) { max($0, $1.rank) }
        for p in 0..<participants { shrinkScratch[p].reserve(tile * maxRank) }
        plan.tokens.withUnsafeBufferPointer { planTokens in
            plan.weights.withUnsafeBufferPointer { planWeights in
                let tokenList = planTokens.baseAddress, weightList = planWeights.baseAddress
                func expertPhase(_ p: Int) {
                    let h = self.shrinkScratch[p].pointer
                    let myNode = self.nodes[p]
                    // Own queue first, then steal from participants of the same node.
                    for offset in 0..<self.participants {
                        let q = (p + offset) % self.participants
                        if offset > 0 && self.nodes[q] != myNode { continue }
                        let end = Int64(starts[q + 1])
                        while true {
                            let i = pg_atomic_fetch_add_i64(cursor + q, 1)
                            if i >= end { break }
                            let item = sorted[Int(i)]
                            let start = self.now()
                            let candidate = copies[Int(item.candidate)]
                            let slot = candidate.nodes.firstIndex(of: myNode) ?? 0
                            let piece = candidate.pieces[slot]
                            let begin = Int(item.begin), count = Int(item.count)
                            LayerExecutor.runExpert(piece, x: x, ldx: inWidth, inWidth: inWidth, outWidth: outWidth,
                                                    tokens: tokenList! + begin, weights: weightList! + begin, count: count,
                                                    h: h, rows: rowBuffer + begin * outWidth)
                            if let observer {
                                observer.observe(RuntimeEvent(kind: offset == 0 ? .item : .steal, worker: p, node: myNode, layer: m,
                                                              expert: piece.expert.rawValue, rows: count, start: start, end: pg_now_ns()))
                            }
                        }
                    }
                }
                if itemCount > 1 && participants > 1 { executor.run(expertPhase) } else if itemCount > 0 { expertPhase(0) }
            }
        }

        // Phase C: combine, split by tokens.
        let combineParticipants = min(participants, max(1, tokens / 8))
        func combinePhase(_ p: Int) {
            guard p < combineParticipants else { return }
            let t0 = tokens * p / combineParticipants, t1 = tokens * (p + 1) / combineParticipants
            guard t1 > t0 else { return }
            let start = self.now()
            LayerExecutor.combine(self.plan, rows: rowBuffer, outWidth: outWidth, tokenRange: t0..<t1, out: out, ldo: outWidth)
            if let observer {
                observer.observe(RuntimeEvent(kind: .combine, worker: p, node: self.nodes[p], layer: m, expert: -1, rows: t1 - t0, start: start, end: pg_now_ns()))
            }
        }
        if combineParticipants > 1 { executor.run(combinePhase) } else { combinePhase(0) }

        if let expertsOut, let weightsOut {
            for i in 0..<(tokens * slots) {
                let c = candidatesOut[i]
                expertsOut[i] = c < 0 ? -1 : module.experts[Int(c)].expert.rawValue
                weightsOut[i] = weightsAll[i]
            }
        }
    }
}
