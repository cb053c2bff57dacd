import CPhatgooseSystem
import PhatgooseKernels
import PhatgooseLibrary
import PhatgooseRouting

/// A unit of work: one candidate's LoRA over a tile of its gathered tokens.
struct WorkItem {
    var group: Int32
    var candidate: Int32
    var begin: Int32
    var count: Int32
    var owner: Int32
}

/// One layer's share of one call in a dispatch: `tokens` rows of `x`, whose delta is added into `out`. The runtime
/// fills the request part; the scheduler fills the results.
struct LayerStep {
    var module: Int
    var x: UnsafePointer<Float>
    var tokens: Int
    var out: UnsafeMutablePointer<Float>
    var expertsOut: UnsafeMutablePointer<Int32>?
    var weightsOut: UnsafeMutablePointer<Float>?
    var routingStride: Int
    /// Results: tokens of this step left unrouted, and the first of them (step-local), or -1.
    var unroutedCount = 0
    var firstUnrouted = -1
    /// The scheduler's: the step's group and its first token there.
    var group = 0
    var groupOffset = 0

    init(module: Int, x: UnsafePointer<Float>, tokens: Int, out: UnsafeMutablePointer<Float>, expertsOut: UnsafeMutablePointer<Int32>?,
         weightsOut: UnsafeMutablePointer<Float>?, routingStride: Int) {
        self.module = module
        self.x = x
        self.tokens = tokens
        self.out = out
        self.expertsOut = expertsOut
        self.weightsOut = weightsOut
        self.routingStride = routingStride
    }
}

/// The steps of one module in a dispatch: one routing pass over the union of their rows, one plan, each expert run
/// once over all of their tokens.
struct StepGroup {
    var module = 0
    /// The gathered input: the single step's own rows, or the steps' rows copied one after another.
    var x: UnsafePointer<Float>?
    var staged = false
    var tokens = 0
    var inWidth = 0
    var outWidth = 0
    var slots = 0
    var candidates = 0
    /// Offsets into the dispatch-wide buffers: routing results (tokens x slots), plan assignments, assignment rows
    /// (floats), the flattened piece table and its per-candidate starts.
    var routingBase = 0
    var assignmentBase = 0
    var assignments = 0
    var rowsBase = 0
    var startsBase = 0
    /// Steps of the group: `stepOrder[firstStep ..< firstStep + stepCount]`.
    var firstStep = 0
    var stepCount = 0
    /// One step and its experts add straight into its output, one after another in expert order on one participant.
    var fused = false
}

/// A routing task: rows `begin ..< begin + count` of one step, or (when `step` is -1) score-column part `begin`.
struct RouteTask {
    var step: Int32
    var begin: Int32
    var count: Int32
}

/// A combine task: tokens `begin ..< end` of one group.
struct CombineTask {
    var group: Int32
    var begin: Int32
    var end: Int32
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

/// Turns a dispatch (the steps of one or many calls, at one or many layers) into parallel phases on the executor:
/// routing split into row tasks (or, for a lone decode step, into score columns), one dispatch plan per layer, work
/// items (layer, expert, token tile) of every layer queued to the participants on the expert's node, balanced
/// longest-first, then the combine split by tokens. Every task of every phase is claimed through an atomic cursor,
/// so any participant may run any of it and the caller alone finishes whatever nobody else took: a worker that is
/// not running never holds a phase up.
///
/// Results equal the single-threaded `LayerExecutor`'s on each call alone, bit for bit: every routed row, every
/// assignment row and every token's combine is computed by the same kernels in the same order whatever the split
/// and whatever other calls share the dispatch (the kernels are tiling-invariant, routing is per row or per
/// sequence, and each token adds its rows in ascending expert order).
///
/// The scheduler is itself the ``ParallelJob`` the executor runs: the state of the phase in flight lives in its
/// fields, so publishing a phase allocates nothing.
///
/// # Thread safety
/// Owned by the runtime's dispatcher: one dispatch at a time uses it. The caller writes the dispatch state and the
/// buffers before publishing a phase; during a phase the participants only read that state and touch disjoint parts
/// of the buffers (their own scratch, the rows of the tasks and items they claimed through the atomic cursors).
/// Hence `@unchecked Sendable`.
final class LayerScheduler: ParallelJob, @unchecked Sendable {
    enum Phase {
        case route
        case score
        case experts
        case combine
    }

    let executor: any ParallelExecutor
    /// The executor's participants (the caller and its workers).
    let poolSize: Int
    let nodes: [Int]
    var tileRows: Int?
    /// Dispatches of fewer tokens run on the caller alone.
    var parallelMinTokens = 1
    /// While the executor reports contention (``ParallelExecutor/prefersCallerAlone``), dispatches of fewer tokens
    /// run on the caller alone.
    var contendedMinTokens = 64
    var observer: (any RuntimeObserver)?
    /// Added to each participant's index in the events it reports (a lane other than the first reports after the
    /// workers).
    var workerBase = 0

    // The dispatch in flight.
    private var phase = Phase.route
    private var snapshot: LibrarySnapshot?
    private var team = 1
    private var steps: UnsafeMutablePointer<LayerStep>?
    private var groupCount = 0
    private var routeTaskCount = 0
    private var combineTaskCount = 0
    /// The lone decode step's prepared rows and scores (score-column routing).
    private var prepared: UnsafePointer<Float>?
    private var preparedLD = 0
    private var preparedRows = 0
    private var scores: UnsafeMutablePointer<Float>?

    private let groups = RawBuffer<StepGroup>()
    private let stepOrder = RawBuffer<Int32>()
    private let groupOfModule = RawBuffer<Int32>()
    private let staging = RawBuffer<Float>()
    private let chosen = RawBuffer<Int32>()
    private let chosenWeights = RawBuffer<Float>()
    private var plans: [DispatchPlan] = []
    private let tokenList = RawBuffer<Int32>()
    private let weightList = RawBuffer<Float>()
    private let pieceTable = RawBuffer<(node: Int32, view: ExpertKernelView)>()
    private let pieceStarts = RawBuffer<Int32>()
    /// Each group's plan offsets (candidate c's assignments), at the same indices as `pieceStarts`.
    private let planOffsets = RawBuffer<Int32>()
    private let rows = RawBuffer<Float>()
    private let routeTasks = RawBuffer<RouteTask>()
    private let combineTasks = RawBuffer<CombineTask>()
    private let items = RawBuffer<WorkItem>()
    private let sortedItems = RawBuffer<WorkItem>()
    private let queueStart = RawBuffer<Int>()
    private let cursors = RawBuffer<Int64>()
    /// The cursor of the route, score and combine tasks.
    private let taskCursor = RawBuffer<Int64>()
    private let ownerLoad = RawBuffer<Int>()
    private let routeScratch: [RawBuffer<Float>]
    private let shrinkScratch: [RawBuffer<Float>]

    /// Groups of one step and at most this many assignments run as one item (see ``runWholeGroup``), unless
    /// `tileRows` asks for smaller items.
    static let wholeGroupAssignments = 32

    private func isWhole(_ g: StepGroup) -> Bool {
        g.stepCount == 1 && g.assignments > 0 && g.assignments <= min(Self.wholeGroupAssignments, tileRows ?? Self.wholeGroupAssignments)
    }

    init(executor: any ParallelExecutor) {
        self.executor = executor
        poolSize = executor.participantCount
        nodes = executor.participantNodes
        routeScratch = (0..<poolSize).map { _ in RawBuffer<Float>() }
        shrinkScratch = (0..<poolSize).map { _ in RawBuffer<Float>() }
    }

    @inline(__always)
    private func now() -> UInt64 { observer == nil ? 0 : pg_now_ns() }

    /// Runs `phase` on every participant (or only on the caller when `parallel` is false).
    private func runPhase(_ phase: Phase, parallel: Bool) {
        self.phase = phase
        taskCursor.pointer[0] = 0
        if parallel && team > 1 { executor.run(self) } else { run(participant: 0) }
    }

    /// One participant's share of the phase in flight: tasks until none is left.
    func run(participant p: Int) {
        switch phase {
        case .route: routeTasks(p)
        case .score: scoreTasks(p)
        case .experts: runItems(p)
        case .combine: combineTasks(p)
        }
    }

    /// Runs `count` steps of `snapshot` as one dispatch, each adding its module's delta for its rows into its
    /// output, and filling its routing buffers when given (`routingStride >= slots`; slots beyond the module's hold
    /// expert -1 and weight 0) and its unrouted tokens (NaN or infinite input; see ``RoutingResult``). Adds each
    /// expert's assignments into `tokensPerExpert` (indexed by library expert) when given. `alone`: run on the caller
    /// only (another lane's dispatch is running).
    func execute(_ snapshot: LibrarySnapshot, steps: UnsafeMutablePointer<LayerStep>, count stepCount: Int,
                 tokensPerExpert: UnsafeMutablePointer<Int>?, alone: Bool = false) {
        guard stepCount > 0 else { return }
        self.snapshot = snapshot
        self.steps = steps
        defer {
            self.snapshot = nil
            self.steps = nil
            prepared = nil
            scores = nil
        }
        var totalTokens = 0
        for s in 0..<stepCount { totalTokens += steps[s].tokens }
        // Beside a busy neighbour (the pool saw its workers preempted), small dispatches stay on the caller.
        let contended = totalTokens < contendedMinTokens && executor.prefersCallerAlone
        team = totalTokens >= parallelMinTokens && !contended && !alone ? poolSize : 1
        let participants = team

        // Groups: the steps of one module, in the order they come.
        let moduleCount = snapshot.library.modules.count
        let groupOf = groupOfModule.reserve(moduleCount)
        for m in 0..<moduleCount { groupOf[m] = -1 }
        let group = groups.reserve(stepCount)
        groupCount = 0
        for s in 0..<stepCount {
            let m = steps[s].module
            if groupOf[m] < 0 {
                groupOf[m] = Int32(groupCount)
                let module = snapshot.library.modules[m]
                var g = StepGroup()
                g.module = m
                g.inWidth = module.inWidth
                g.outWidth = module.outWidth
                g.slots = snapshot.routers[m].slots
                g.candidates = module.experts.count
                group[groupCount] = g
                groupCount += 1
            }
            let g = Int(groupOf[m])
            steps[s].group = g
            steps[s].groupOffset = group[g].tokens
            group[g].tokens += steps[s].tokens
            group[g].stepCount += 1
        }
        // Step order by group (stable), and each group's offsets into the dispatch-wide buffers.
        var routingTotal = 0, stagingTotal = 0, startsTotal = 0, piecesTotal = 0
        var stepCursor = 0
        for g in 0..<groupCount {
            group[g].firstStep = stepCursor
            stepCursor += group[g].stepCount
            group[g].stepCount = 0
            group[g].routingBase = routingTotal
            routingTotal += group[g].tokens * group[g].slots
            group[g].staged = false
            if group[g].firstStep + 1 != stepCursor {
                group[g].staged = true
                stagingTotal += group[g].tokens * group[g].inWidth
            }
            group[g].startsBase = startsTotal
            startsTotal += group[g].candidates + 1
            piecesTotal += snapshot.pieceViews[group[g].module].count
        }
        let order = stepOrder.reserve(stepCount)
        for s in 0..<stepCount {
            let g = steps[s].group
            order[group[g].firstStep + group[g].stepCount] = Int32(s)
            group[g].stepCount += 1
        }
        let stage = staging.reserve(stagingTotal)
        var stageOffset = 0
        for g in 0..<groupCount {
            if group[g].staged {
                group[g].x = UnsafePointer(stage + stageOffset)
                stageOffset += group[g].tokens * group[g].inWidth
            } else {
                group[g].x = steps[Int(order[group[g].firstStep])].x
            }
        }
        let candidatesOut = chosen.reserve(routingTotal)
        let weightsAll = chosenWeights.reserve(routingTotal)
        // The piece tables, flattened for the dispatch (plain values: no reference counting on the hot path).
        let table = pieceTable.reserve(piecesTotal)
        let starts = pieceStarts.reserve(startsTotal)
        var tableOffset = 0
        for g in 0..<groupCount {
            let m = group[g].module
            snapshot.pieceViews[m].withUnsafeBufferPointer { views in
                for (i, v) in views.enumerated() { table[tableOffset + i] = v }
            }
            snapshot.pieceStarts[m].withUnsafeBufferPointer { moduleStarts in
                for (i, start) in moduleStarts.enumerated() { starts[group[g].startsBase + i] = Int32(tableOffset) + start }
            }
            tableOffset += snapshot.pieceViews[m].count
        }

        // Phase A: routing. A lone step with few routed rows (decode) on several participants: the caller prepares
        // the rows, participants split the candidates' scores (each reads only its part of the gate matrix), and the
        // caller selects. Otherwise row tasks (whole sequences when routing per sequence), which also gather the
        // rows of a group of several steps.
        let lone = stepCount == 1 ? snapshot.routers[steps[0].module] : nil
        let loneUnits = lone.map { $0.routedRowCount(tokens: steps[0].tokens) } ?? 0
        if let router = lone, router.options.router != .uniform, participants > 1, loneUnits < participants * 2 {
            let step = steps[0]
            let g = group[0]
            let scratch = routeScratch[0].reserve(router.scratchCount(tokens: step.tokens))
            let start = now()
            let rowsPrepared = router.prepare(step.x, ldx: g.inWidth, tokens: step.tokens, scratch: scratch)
            prepared = rowsPrepared.rows
            preparedLD = rowsPrepared.ld
            preparedRows = rowsPrepared.count
            scores = router.scoresPointer(scratch, tokens: step.tokens)
            runPhase(.score, parallel: true)
            router.select(scores!, rows: rowsPrepared.count, tokens: step.tokens, candidates: candidatesOut, weights: weightsAll)
            if let observer {
                observer.observe(RuntimeEvent(kind: .routing, worker: workerBase, node: nodes[0], layer: step.module, expert: -1, rows: step.tokens,
                                              start: start, end: pg_now_ns()))
            }
        } else {
            var totalUnits = 0
            for s in 0..<stepCount { totalUnits += snapshot.routers[steps[s].module].routedRowCount(tokens: steps[s].tokens) }
            // Near-equal tasks, a few per participant, at least 8 routed rows each.
            let perTask = max(8, (totalUnits + participants * 2 - 1) / (participants * 2))
            var taskCount = 0
            for s in 0..<stepCount {
                let router = snapshot.routers[steps[s].module]
                let n = router.options.router == .uniform ? 1 : (router.routedRowCount(tokens: steps[s].tokens) + perTask - 1) / perTask
                taskCount += max(1, n)
            }
            let tasks = routeTasks.reserve(taskCount)
            var scratchTokens = 1
            routeTaskCount = 0
            for s in 0..<stepCount {
                let router = snapshot.routers[steps[s].module]
                let tokens = steps[s].tokens
                var unit = 1
                if case let .sequence(length) = router.options.granularity { unit = min(length, tokens) }
                let stepUnits = router.routedRowCount(tokens: tokens)
                let n = router.options.router == .uniform ? 1 : max(1, (stepUnits + perTask - 1) / perTask)
                for i in 0..<n {
                    let t0 = min(tokens, stepUnits * i / n * unit), t1 = min(tokens, stepUnits * (i + 1) / n * unit)
                    guard t1 > t0 else { continue }
                    tasks[routeTaskCount] = RouteTask(step: Int32(s), begin: Int32(t0), count: Int32(t1 - t0))
                    routeTaskCount += 1
                    scratchTokens = max(scratchTokens, t1 - t0)
                }
            }
            let workers = routeTaskCount > 1 ? participants : 1
            for p in 0..<workers {
                var need = 1
                for g in 0..<groupCount { need = max(need, snapshot.routers[group[g].module].scratchCount(tokens: scratchTokens)) }
                routeScratch[p].reserve(need)
            }
            runPhase(.route, parallel: routeTaskCount > 1)
        }

        // Unrouted tokens, per step.
        for s in 0..<stepCount {
            let g = group[steps[s].group]
            let left = LayerRouter.unroutedTokens(candidatesOut + g.routingBase + steps[s].groupOffset * g.slots, tokens: steps[s].tokens, slots: g.slots)
            steps[s].unroutedCount = left.count
            steps[s].firstUnrouted = left.first ?? -1
        }

        // The plans, on the caller, and the dispatch-wide assignment lists.
        while plans.count < groupCount { plans.append(DispatchPlan()) }
        var assignmentTotal = 0, rowsTotal = 0
        for g in 0..<groupCount {
            let planStart = now()
            let base = group[g].routingBase
            plans[g].build(tokens: group[g].tokens, slots: group[g].slots, chosen: candidatesOut + base, weights: weightsAll + base,
                           candidates: group[g].candidates)
            group[g].assignmentBase = assignmentTotal
            group[g].assignments = plans[g].assignmentCount
            assignmentTotal += group[g].assignments
            if let observer {
                observer.observe(RuntimeEvent(kind: .plan, worker: workerBase, node: nodes[0], layer: group[g].module, expert: -1, rows: group[g].assignments,
                                              start: planStart, end: pg_now_ns()))
            }
        }
        let tokenTable = tokenList.reserve(assignmentTotal)
        let weightTable = weightList.reserve(assignmentTotal)
        let offsets = planOffsets.reserve(startsTotal)
        for g in 0..<groupCount {
            plans[g].offsets.withUnsafeBufferPointer { for (i, o) in $0.enumerated() { offsets[group[g].startsBase + i] = o } }
            let base = group[g].assignmentBase
            plans[g].tokens.withUnsafeBufferPointer { for (i, t) in $0.enumerated() where i < group[g].assignments { tokenTable[base + i] = t } }
            plans[g].weights.withUnsafeBufferPointer { for (i, w) in $0.enumerated() where i < group[g].assignments { weightTable[base + i] = w } }
            if let tokensPerExpert {
                snapshot.candidateExperts[group[g].module].withUnsafeBufferPointer { experts in
                    for c in 0..<group[g].candidates { tokensPerExpert[Int(experts[c])] += plans[g].range(of: c).count }
                }
            }
        }

        // Work items: tiles of each candidate's tokens, so a popular expert cannot serialise the layer.
        let tile = max(1, tileRows ?? min(256, max(16, (assignmentTotal + participants * 4 - 1) / (participants * 4))))
        var itemCount = 0
        for g in 0..<groupCount {
            if isWhole(group[g]) { itemCount += 1; continue }
            for c in 0..<group[g].candidates { itemCount += (plans[g].range(of: c).count + tile - 1) / tile }
        }
        let itemList = items.reserve(itemCount)
        let sorted = sortedItems.reserve(itemCount)
        let load = ownerLoad.reserve(participants)
        let queueStarts = queueStart.reserve(participants + 1)
        let cursor = cursors.reserve(participants)
        for p in 0..<participants { load[p] = 0 }
        var n = 0
        var maxRank = 1
        for g in 0..<groupCount {
            let firstItem = n
            // A small group of one step (a decode step) is one item: all of its experts, in expert order, on one
            // participant, adding straight into the step's output (no rows, no combine).
            if isWhole(group[g]) {
                itemList[n] = WorkItem(group: Int32(g), candidate: -1, begin: 0, count: Int32(group[g].assignments), owner: 0)
                n += 1
                group[g].fused = true
                continue
            }
            for c in 0..<group[g].candidates {
                let range = plans[g].range(of: c)
                var begin = range.lowerBound
                while begin < range.upperBound {
                    let count = min(tile, range.upperBound - begin)
                    itemList[n] = WorkItem(group: Int32(g), candidate: Int32(c), begin: Int32(begin), count: Int32(count), owner: 0)
                    n += 1
                    begin += count
                }
            }
            // One step alone adds straight into its output when one participant runs all of its items in order: the
            // caller alone, or its only item.
            group[g].fused = group[g].stepCount == 1 && (participants == 1 || n - firstItem <= 1)
            if !group[g].fused {
                group[g].rowsBase = rowsTotal
                rowsTotal += group[g].assignments * group[g].outWidth
            }
        }
        // Owners: the least-loaded participant on a node holding the candidate (any participant when no participant
        // sits on such a node).
        for i in 0..<itemCount {
            let g = Int(itemList[i].group)
            var c = Int(itemList[i].candidate)
            if c < 0 {
                c = 0
                while c + 1 < group[g].candidates && offsets[group[g].startsBase + c + 1] == offsets[group[g].startsBase + c] { c += 1 }
                for j in Int(starts[group[g].startsBase])..<Int(starts[group[g].startsBase + group[g].candidates]) { maxRank = max(maxRank, table[j].view.rank) }
            }
            let holders = Int(starts[group[g].startsBase + c])..<Int(starts[group[g].startsBase + c + 1])
            for j in holders { maxRank = max(maxRank, table[j].view.rank) }
            var best = -1
            for p in 0..<participants where (best < 0 || load[p] < load[best])
                && holders.contains(where: { table[$0].node == Int32(nodes[p]) }) { best = p }
            if best < 0 { for p in 0..<participants where best < 0 || load[p] < load[best] { best = p } }
            itemList[i].owner = Int32(best)
            load[best] += Int(itemList[i].count)
        }
        // Counting sort by owner into per-participant queues (stable: a fused group's items stay in expert order).
        for p in 0...participants { queueStarts[p] = 0 }
        for i in 0..<itemCount { queueStarts[Int(itemList[i].owner) + 1] += 1 }
        for p in 0..<participants { queueStarts[p + 1] += queueStarts[p] }
        for p in 0..<participants { cursor[p] = Int64(queueStarts[p]) }
        for i in 0..<itemCount {
            let owner = Int(itemList[i].owner)
            sorted[Int(cursor[owner])] = itemList[i]
            cursor[owner] += 1
        }
        for p in 0..<participants { cursor[p] = Int64(queueStarts[p]) }

        // Phase B: experts, every layer's items in one phase.
        if rowsTotal > 0 { rows.reserve(rowsTotal) }
        for p in 0..<participants { shrinkScratch[p].reserve(max(tile, Self.wholeGroupAssignments) * maxRank) }
        if itemCount > 0 { runPhase(.experts, parallel: itemCount > 1) }

        // Phase C: combine, split by tokens (8 or more per task).
        var combineCount = 0
        for g in 0..<groupCount where !group[g].fused { combineCount += min(participants, max(1, group[g].tokens / 8)) }
        if combineCount > 0 {
            let tasks = combineTasks.reserve(combineCount)
            combineTaskCount = 0
            for g in 0..<groupCount where !group[g].fused {
                let parts = min(participants, max(1, group[g].tokens / 8))
                for i in 0..<parts {
                    let t0 = group[g].tokens * i / parts, t1 = group[g].tokens * (i + 1) / parts
                    guard t1 > t0 else { continue }
                    tasks[combineTaskCount] = CombineTask(group: Int32(g), begin: Int32(t0), end: Int32(t1))
                    combineTaskCount += 1
                }
            }
            runPhase(.combine, parallel: combineTaskCount > 1)
        }

        // Each step's routing, in library expert indices.
        for s in 0..<stepCount {
            guard let expertsOut = steps[s].expertsOut, let weightsOut = steps[s].weightsOut else { continue }
            let g = group[steps[s].group]
            let slots = g.slots, stride = steps[s].routingStride
            let candidates = candidatesOut + g.routingBase + steps[s].groupOffset * slots
            let weights = weightsAll + g.routingBase + steps[s].groupOffset * slots
            snapshot.candidateExperts[g.module].withUnsafeBufferPointer { experts in
                for t in 0..<steps[s].tokens {
                    for j in 0..<slots {
                        let c = candidates[t * slots + j]
                        expertsOut[t * stride + j] = c < 0 ? -1 : experts[Int(c)]
                        weightsOut[t * stride + j] = weights[t * slots + j]
                    }
                    for j in slots..<stride {
                        expertsOut[t * stride + j] = -1
                        weightsOut[t * stride + j] = 0
                    }
                }
            }
        }
    }

    private func routeTasks(_ p: Int) {
        guard let snapshot, let steps else { return }
        let group = groups.pointer
        let candidatesOut = chosen.pointer, weightsAll = chosenWeights.pointer
        while true {
            let i = Int(pg_atomic_fetch_add_i64(taskCursor.pointer, 1))
            if i >= routeTaskCount { break }
            let task = routeTasks.pointer[i]
            let step = steps[Int(task.step)]
            let g = group[step.group]
            let router = snapshot.routers[g.module]
            let t0 = Int(task.begin), count = Int(task.count)
            let start = now()
            let at = g.routingBase + (step.groupOffset + t0) * g.slots
            router.route(step.x + t0 * g.inWidth, ldx: g.inWidth, tokens: count, scratch: routeScratch[p].pointer,
                         candidates: candidatesOut + at, weights: weightsAll + at)
            if g.staged {
                UnsafeMutablePointer(mutating: g.x!).advanced(by: (step.groupOffset + t0) * g.inWidth)
                    .update(from: step.x + t0 * g.inWidth, count: count * g.inWidth)
            }
            if let observer {
                observer.observe(RuntimeEvent(kind: .routing, worker: workerBase + p, node: nodes[p], layer: g.module, expert: -1, rows: count, start: start, end: pg_now_ns()))
            }
        }
    }

    private func scoreTasks(_ p: Int) {
        guard let snapshot, let steps else { return }
        let router = snapshot.routers[steps[0].module]
        while true {
            let part = Int(pg_atomic_fetch_add_i64(taskCursor.pointer, 1))
            if part >= team { break }
            router.score(prepared!, ld: preparedLD, rows: preparedRows, columns: router.scoreColumns(part: part, of: team), into: scores!)
        }
    }

    /// Participant p's work items, then stolen ones: its node's queues first, then every other queue, so the items
    /// of a participant that never came are run by those that did (the caller last of all).
    private func runItems(_ p: Int) {
        let h = shrinkScratch[p].pointer
        let myNode = nodes[p]
        let sorted = sortedItems.pointer, queueStarts = queueStart.pointer, cursor = cursors.pointer
        let group = groups.pointer, table = pieceTable.pointer, starts = pieceStarts.pointer
        let tokens = tokenList.pointer, weights = weightList.pointer, rowBuffer = rows.pointer
        for pass in 0..<2 {
            for offset in 0..<team {
                let q = (p + offset) % team
                if (nodes[q] == myNode) != (pass == 0) { continue }
                let end = Int64(queueStarts[q + 1])
                while true {
                    let i = pg_atomic_fetch_add_i64(cursor + q, 1)
                    if i >= end { break }
                    let item = sorted[Int(i)]
                    let g = group[Int(item.group)]
                    if item.candidate < 0 {
                        runWholeGroup(g, participant: p, node: myNode, h: h, stolen: q != p)
                        continue
                    }
                    let start = now()
                    // The copy on this participant's node, else the primary.
                    let first = Int(starts[g.startsBase + Int(item.candidate)]), last = Int(starts[g.startsBase + Int(item.candidate) + 1])
                    var chosen = first
                    for j in first..<last where table[j].node == Int32(myNode) { chosen = j; break }
                    let piece = table[chosen].view
                    let begin = g.assignmentBase + Int(item.begin), count = Int(item.count)
                    if g.fused {
                        LayerExecutor.runExpertAdding(piece, x: g.x!, ldx: g.inWidth, inWidth: g.inWidth, outWidth: g.outWidth,
                                                      tokens: tokens + begin, weights: weights + begin, count: count,
                                                      h: h, out: steps![Int(stepOrder.pointer[g.firstStep])].out, ldo: g.outWidth)
                    } else {
                        LayerExecutor.runExpert(piece, x: g.x!, ldx: g.inWidth, inWidth: g.inWidth, outWidth: g.outWidth,
                                                tokens: tokens + begin, weights: weights + begin, count: count,
                                                h: h, rows: rowBuffer + g.rowsBase + Int(item.begin) * g.outWidth)
                    }
                    if let observer {
                        observer.observe(RuntimeEvent(kind: q == p ? .item : .steal, worker: workerBase + p, node: myNode, layer: g.module,
                                                      expert: piece.expert, rows: count, start: start, end: pg_now_ns()))
                    }
                }
            }
        }
    }

    /// All of a small group's experts, in expert order, adding into its one step's output.
    private func runWholeGroup(_ g: StepGroup, participant p: Int, node myNode: Int, h: UnsafeMutablePointer<Float>, stolen: Bool) {
        let table = pieceTable.pointer, starts = pieceStarts.pointer, offsets = planOffsets.pointer
        let tokens = tokenList.pointer, weights = weightList.pointer
        let out = steps![Int(stepOrder.pointer[g.firstStep])].out
        for c in 0..<g.candidates {
            let begin = Int(offsets[g.startsBase + c]), end = Int(offsets[g.startsBase + c + 1])
            guard end > begin else { continue }
            let start = now()
            let first = Int(starts[g.startsBase + c]), last = Int(starts[g.startsBase + c + 1])
            var chosen = first
            for j in first..<last where table[j].node == Int32(myNode) { chosen = j; break }
            let piece = table[chosen].view
            LayerExecutor.runExpertAdding(piece, x: g.x!, ldx: g.inWidth, inWidth: g.inWidth, outWidth: g.outWidth,
                                          tokens: tokens + g.assignmentBase + begin, weights: weights + g.assignmentBase + begin,
                                          count: end - begin, h: h, out: out, ldo: g.outWidth)
            if let observer {
                observer.observe(RuntimeEvent(kind: stolen ? .steal : .item, worker: workerBase + p, node: myNode, layer: g.module,
                                              expert: piece.expert, rows: end - begin, start: start, end: pg_now_ns()))
            }
        }
    }

    private func combineTasks(_ p: Int) {
        guard let steps else { return }
        let group = groups.pointer, order = stepOrder.pointer
        while true {
            let i = Int(pg_atomic_fetch_add_i64(taskCursor.pointer, 1))
            if i >= combineTaskCount { break }
            let task = combineTasks.pointer[i]
            let g = group[Int(task.group)]
            let t0 = Int(task.begin), t1 = Int(task.end)
            let start = now()
            // Each step of the group that the range covers adds into its own output.
            for k in g.firstStep..<(g.firstStep + g.stepCount) {
                let step = steps[Int(order[k])]
                let lower = max(t0, step.groupOffset), upper = min(t1, step.groupOffset + step.tokens)
                guard upper > lower else { continue }
                LayerExecutor.combine(plans[Int(task.group)], rows: rows.pointer + g.rowsBase, outWidth: g.outWidth, tokenRange: lower..<upper,
                                      out: step.out, ldo: g.outWidth, firstToken: step.groupOffset)
            }
            if let observer {
                observer.observe(RuntimeEvent(kind: .combine, worker: workerBase + p, node: nodes[p], layer: g.module, expert: -1, rows: t1 - t0, start: start, end: pg_now_ns()))
            }
        }
    }
}
