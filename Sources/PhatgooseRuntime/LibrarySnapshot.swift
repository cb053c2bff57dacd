import PhatgooseLibrary
import PhatgooseRouting

/// One immutable version of the served library: modules with their routers and each expert's weights in the memory
/// of its node(s). Calls take the current snapshot when they start and keep it to the end, so a live change (adding
/// or removing an expert) never shows a call a half-updated library; the old version is freed when its last call
/// ends (RCU by reference counting). A new snapshot shares by reference the weight copies of every expert whose
/// placement did not change, so a live change copies only the added expert, and memory held by old snapshots still
/// serving calls is counted in the runtime's ledger (`ledger`) until they are freed.
///
/// # Thread safety
/// Immutable after `init`; all stored properties are `let` of Sendable types.
final class LibrarySnapshot: Sendable {
    /// Copies of one candidate's weights, one per node holding them (first: primary).
    struct Copies: Sendable {
        var nodes: [Int]
        var pieces: [ModuleExpert]
    }

    let id: Int
    let library: ExpertLibrary
    let routers: [LayerRouter]
    /// `copies[m][c]`: where candidate c of module m lives.
    let copies: [[Copies]]
    let placement: PlacementPlan
    /// `expertCopies[e]`: expert e's copies, one per node of `placement.nodes[e]`, in that order (empty when the
    /// expert has no weights, e.g. removed). Shared with the snapshots before and after while the placement holds.
    let expertCopies: [[ExpertCopy]]
    /// Per node, the allocations of the copies placed there (empty when the policy is in place), for the placement
    /// report.
    let arenas: [NodeShard]
    /// Experts removed while serving (their indices stay reserved).
    let retired: Set<ExpertIndex>
    /// Bytes of expert weights this snapshot references (copies included); memory it shares with other snapshots is
    /// counted in each. What is really held is `ledger.bytes`.
    let residentBytes: Int
    /// The runtime-wide count of bytes held by live copies, shared by all its snapshots.
    let ledger: ResidentLedger
    /// Largest rank and widths, for sizing scratch.
    let maxRank: Int
    let maxInWidth: Int
    let maxOutWidth: Int
    let maxCandidates: Int
    /// `copies` flattened per module for the hot path, as plain values (no reference counting when read):
    /// `pieceViews[m][pieceStarts[m][c] ..< pieceStarts[m][c + 1]]` are candidate c's copies, primary first, each
    /// with its node. The views point into the weights that `copies` keeps alive.
    let pieceViews: [[(node: Int32, view: ExpertKernelView)]]
    let pieceStarts: [[Int32]]
    /// `candidateExperts[m][c]`: the library index of candidate c of module m.
    let candidateExperts: [[Int32]]

    init(id: Int, library: ExpertLibrary, routers: [LayerRouter], copies: [[Copies]], placement: PlacementPlan,
         expertCopies: [[ExpertCopy]], arenas: [NodeShard], retired: Set<ExpertIndex>, residentBytes: Int, ledger: ResidentLedger) {
        self.id = id
        self.library = library
        self.routers = routers
        self.copies = copies
        self.placement = placement
        self.expertCopies = expertCopies
        self.arenas = arenas
        self.retired = retired
        self.residentBytes = residentBytes
        self.ledger = ledger
        maxRank = library.modules.flatMap(\.experts).map(\.rank).max() ?? 1
        maxInWidth = library.modules.map(\.inWidth).max() ?? 1
        maxOutWidth = library.modules.map(\.outWidth).max() ?? 1
        maxCandidates = library.modules.map(\.experts.count).max() ?? 1
        pieceViews = copies.map { module in
            module.flatMap { candidate in zip(candidate.nodes, candidate.pieces).map { (node: Int32($0.0), view: ExpertKernelView($0.1)) } }
        }
        pieceStarts = copies.map { module in
            module.reduce(into: [Int32(0)]) { starts, candidate in
                // The hot path picks a copy from this range without bounds checks: every candidate needs one.
                precondition(!candidate.pieces.isEmpty && candidate.pieces.count == candidate.nodes.count,
                             "every candidate needs at least one placed copy of its weights")
                starts.append(starts.last! + Int32(candidate.pieces.count))
            }
        }
        candidateExperts = library.modules.map { module in module.experts.map(\.expert.rawValue) }
    }

    /// Builds a snapshot: places every live expert's weights per `policy` (copying them into node-bound memory, one
    /// allocation per expert and node, unless the policy is in place) and builds each module's router. `reuse`
    /// supplies routers of unchanged modules.
    ///
    /// With `previous` (a live change), placement is stable (``PlacementPlan/extending(_:policy:topology:bytes:load:)``)
    /// and every expert that keeps its nodes keeps its copies: only what changed is copied. The memory cap is then
    /// checked against the bytes really held (`previous.ledger`, which counts older snapshots still serving calls)
    /// plus the new copies, before anything is copied.
    static func build(id: Int, library: ExpertLibrary, retired: Set<ExpertIndex>, options: RoutingOptions, topology: Topology,
                      policy: PlacementPolicy, load: [Double]?, memoryCap: Int?,
                      reuse: [String: LayerRouter] = [:], previous: LibrarySnapshot? = nil) throws -> LibrarySnapshot {
        // Each expert's pieces, module by module (the order of its tensors in its allocations).
        var piecesOf = [[(module: String, piece: ModuleExpert)]](repeating: [], count: library.experts.count)
        var bytes = [Int](repeating: 0, count: library.experts.count)
        for module in library.modules {
            for piece in module.experts {
                piecesOf[piece.expert.int].append((module.name, piece))
                bytes[piece.expert.int] += piece.a.byteCount + piece.bTransposed.byteCount
            }
        }
        if let load, load.count != library.experts.count {
            throw RuntimeError(.option, "load profile: expected one value per expert (\(library.experts.count)), found \(load.count)")
        }
        let plan = try previous.map { try PlacementPlan.extending($0.placement, policy: policy, topology: topology, bytes: bytes, load: load) }
            ?? PlacementPlan.make(policy: policy, topology: topology, bytes: bytes, load: load)
        let ledger = previous?.ledger ?? ResidentLedger()
        let inPlace = policy == .inPlace

        // Keep the copies of every expert placed as before; the others need new ones.
        var expertCopies = [[ExpertCopy]](repeating: [], count: library.experts.count)
        var toCopy: [Int] = []
        var added = 0
        for e in bytes.indices where bytes[e] > 0 {
            if let kept = previous?.reusableCopies(of: e, nodes: plan.nodes[e], pieces: piecesOf[e]) {
                expertCopies[e] = kept
            } else {
                toCopy.append(e)
                added += inPlace ? bytes[e] : bytes[e] * plan.nodes[e].count
            }
        }
        let live = library.experts.count - retired.count
        if let memoryCap, added > 0 {
            if previous == nil, added > memoryCap {
                throw RuntimeError(.memoryCap, "memory cap: expected at most \(memoryCap) bytes of expert weights, found \(added) needed for \(live) experts")
            }
            // Older snapshots may still be serving calls: what they hold stays resident until their last call ends.
            let held = ledger.bytes
            if previous != nil, held + added > memoryCap {
                throw RuntimeError(.memoryCap, "memory cap: expected at most \(memoryCap) bytes of expert weights, found \(held + added) needed for \(live) experts: \(held) held (snapshots still serving calls included) plus \(added) to copy")
            }
        }
        for e in toCopy {
            if inPlace {
                let charge = ResidentCharge(bytes[e], in: ledger)
                expertCopies[e] = [ExpertCopy(node: plan.nodes[e].first ?? 0, arena: nil, charge: charge,
                                              pieces: Dictionary(uniqueKeysWithValues: piecesOf[e].map { ($0.module, $0.piece) }))]
                continue
            }
            // Each tensor is padded to 64 bytes in the allocation.
            let capacity = bytes[e] + 64 * 2 * piecesOf[e].count + 64
            expertCopies[e] = plan.nodes[e].map { node in
                let arena = NodeArena(node: node, memoryNode: topology.nodes[node].memoryNode, capacity: capacity,
                                      charge: ResidentCharge(bytes[e], in: ledger))
                var pieces: [String: ModuleExpert] = [:]
                for (module, piece) in piecesOf[e] {
                    var copy = piece
                    copy.a = arena.copy(piece.a)
                    copy.bTransposed = arena.copy(piece.bTransposed)
                    pieces[module] = copy
                }
                return ExpertCopy(node: node, arena: arena, charge: nil, pieces: pieces)
            }
        }

        let copies = library.modules.map { module in
            module.experts.map { piece in
                let held = expertCopies[piece.expert.int]
                return Copies(nodes: held.map(\.node), pieces: held.map { $0.pieces[module.name]! })
            }
        }
        let arenas: [NodeShard] = inPlace ? [] : topology.nodes.map { node in
            NodeShard(node: node.id, memoryNode: node.memoryNode,
                      arenas: expertCopies.flatMap { $0.compactMap { $0.node == node.id ? $0.arena : nil } })
        }
        let resident = bytes.indices.reduce(0) { $0 + bytes[$1] * expertCopies[$1].count }
        let routers = try library.modules.map { module in
            try reuse[module.name] ?? LayerRouter(module: module, options: options)
        }
        return LibrarySnapshot(id: id, library: library, routers: routers, copies: copies, placement: plan, expertCopies: expertCopies,
                               arenas: arenas, retired: retired, residentBytes: resident, ledger: ledger)
    }

    /// Expert e's copies in this snapshot, if a snapshot placing it on `nodes` with these pieces can share them: the
    /// same nodes in the same order, and a copy of every one of its pieces (an expert's weights never change while
    /// served; the check guards against a module list that disagrees).
    private func reusableCopies(of e: Int, nodes: [Int], pieces: [(module: String, piece: ModuleExpert)]) -> [ExpertCopy]? {
        guard e < expertCopies.count else { return nil }
        let held = expertCopies[e]
        guard !held.isEmpty, held.map(\.node) == nodes else { return nil }
        for copy in held {
            guard copy.pieces.count == pieces.count else { return nil }
            for (module, piece) in pieces {
                guard let kept = copy.pieces[module], kept.expert == piece.expert, kept.rank == piece.rank,
                      kept.a.byteCount == piece.a.byteCount, kept.bTransposed.byteCount == piece.bTransposed.byteCount else { return nil }
            }
        }
        return held
    }
}

/// One copy of one expert's weights on one node: every module's pieces of that expert, their tensors in one
/// node-bound allocation (or, in place, the library's own tensors). Snapshots share it by reference while the
/// expert keeps its node.
///
/// # Thread safety
/// Immutable; all stored properties are `let` of Sendable types.
final class ExpertCopy: Sendable {
    let node: Int
    /// The allocation holding the copied tensors (nil in place). It counts its bytes in the runtime's ledger.
    let arena: NodeArena?
    /// In place: the bytes of the library's tensors this copy serves from, counted in the ledger while it lives.
    let charge: ResidentCharge?
    /// The expert's piece per module name, its tensors pointing into `arena` (in place: the library's tensors).
    let pieces: [String: ModuleExpert]

    init(node: Int, arena: NodeArena?, charge: ResidentCharge?, pieces: [String: ModuleExpert]) {
        self.node = node
        self.arena = arena
        self.charge = charge
        self.pieces = pieces
    }
}
