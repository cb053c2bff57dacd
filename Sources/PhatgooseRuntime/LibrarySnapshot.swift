import PhatgooseLibrary
import PhatgooseRouting

/// One immutable version of the served library: modules with their routers and each expert's weights in the memory
/// of its node(s). Calls take the current snapshot when they start and keep it to the end, so a live change (adding
/// or removing an expert) never shows a call a half-updated library; the old version is freed when its last call
/// ends (RCU by reference counting).
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
    let arenas: [NodeArena]
    /// Experts removed while serving (their indices stay reserved).
    let retired: Set<ExpertIndex>
    /// Bytes of expert weights this snapshot holds (copies included).
    let residentBytes: Int
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
         arenas: [NodeArena], retired: Set<ExpertIndex>, residentBytes: Int) {
        self.id = id
        self.library = library
        self.routers = routers
        self.copies = copies
        self.placement = placement
        self.arenas = arenas
        self.retired = retired
        self.residentBytes = residentBytes
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

    /// Builds a snapshot: places every live expert's weights per `policy` (copying them into node-bound memory unless
    /// the policy is in-place) and builds each module's router. `reuse` supplies routers of unchanged modules.
    static func build(id: Int, library: ExpertLibrary, retired: Set<ExpertIndex>, options: RoutingOptions, topology: Topology,
                      policy: PlacementPolicy, load: [Double]?, memoryCap: Int?,
                      reuse: [String: LayerRouter] = [:]) throws -> LibrarySnapshot {
        var bytes = [Int](repeating: 0, count: library.experts.count)
        for module in library.modules {
            for piece in module.experts { bytes[piece.expert.int] += piece.a.byteCount + piece.bTransposed.byteCount }
        }
        if let load, load.count != library.experts.count {
            throw RuntimeError(.option, "load profile: expected one value per expert (\(library.experts.count)), found \(load.count)")
        }
        let plan = try PlacementPlan.make(policy: policy, topology: topology, bytes: bytes, load: load)
        let resident = policy == .inPlace ? bytes.reduce(0, +) : bytes.indices.reduce(0) { $0 + bytes[$1] * plan.nodes[$1].count }
        if let memoryCap, resident > memoryCap {
            throw RuntimeError(.memoryCap, "memory cap: expected at most \(memoryCap) bytes of expert weights, found \(resident) needed for \(library.experts.count - retired.count) experts")
        }
        var arenas: [NodeArena] = []
        var copies: [[Copies]] = []
        if policy == .inPlace {
            copies = library.modules.map { module in module.experts.map { Copies(nodes: [plan.nodes[$0.expert.int].first ?? 0], pieces: [$0]) } }
        } else {
            var perNode = [Int](repeating: 0, count: topology.nodes.count)
            for e in bytes.indices { for node in plan.nodes[e] { perNode[node] += bytes[e] } }
            // Each tensor is padded to 64 bytes in the arena.
            let tensors = library.modules.reduce(0) { $0 + 2 * $1.experts.count }
            arenas = topology.nodes.map { NodeArena(node: $0.id, memoryNode: $0.memoryNode, capacity: perNode[$0.id] + 64 * tensors + 64) }
            copies = library.modules.map { module in
                module.experts.map { piece in
                    let nodes = plan.nodes[piece.expert.int]
                    let pieces = nodes.map { node -> ModuleExpert in
                        var copy = piece
                        copy.a = arenas[node].copy(piece.a)
                        copy.bTransposed = arenas[node].copy(piece.bTransposed)
                        return copy
                    }
                    return Copies(nodes: nodes, pieces: pieces)
                }
            }
        }
        let routers = try library.modules.map { module in
            try reuse[module.name] ?? LayerRouter(module: module, options: options)
        }
        return LibrarySnapshot(id: id, library: library, routers: routers, copies: copies, placement: plan, arenas: arenas,
                               retired: retired, residentBytes: resident)
    }
}
