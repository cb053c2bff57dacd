import CNuma
import CPhatgooseSystem
import PhatgooseFormats
import PhatgooseLibrary
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Where expert weights live.
public enum PlacementPolicy: Sendable, Equatable {
    /// Experts spread over all nodes, balanced by bytes (or by measured load when a profile is given). The default.
    case distribute
    /// Every expert on one node.
    case isolate(node: Int)
    /// Like `distribute`, plus the `count` hottest experts (by the load profile, else by bytes) copied to every node.
    case replicateHot(count: Int)
    /// No copies: weights stay where the library has them (the file mapping). For memory-constrained embedding.
    case inPlace
}

/// Bytes of expert weights held by live copies, across every snapshot of one runtime: the current one and older ones
/// still serving calls. What the memory cap is checked against.
///
/// # Thread safety
/// One atomic counter: a copy is charged where it is made (under the runtime's change lock) and released in its
/// `deinit`, on whatever thread dropped the last reference (often a caller finishing the last call on an old snapshot).
final class ResidentLedger: Sendable {
    private let held = Atomic<Int>(0)

    /// Bytes held now.
    var bytes: Int { held.load(ordering: .sequentiallyConsistent) }

    fileprivate func add(_ bytes: Int) { held.add(bytes, ordering: .sequentiallyConsistent) }
}

/// `bytes` counted in a ledger for as long as this object lives.
final class ResidentCharge: Sendable {
    let ledger: ResidentLedger
    let bytes: Int

    init(_ bytes: Int, in ledger: ResidentLedger) {
        self.ledger = ledger
        self.bytes = bytes
        ledger.add(bytes)
    }

    deinit { ledger.add(-bytes) }
}

/// Memory bound to one NUMA node (libnuma's `numa_alloc_onnode`, or ordinary page-aligned memory where NUMA is
/// unavailable), holding one copy of one expert's weights (every module's tensors of that expert), copied in by the
/// runtime. Snapshots share it by reference for as long as the expert keeps its node.
///
/// # Thread safety
/// Filled by its creator before it is shared, then read-only; freed in `deinit` (which also releases its bytes from
/// the runtime's ledger). Hence `@unchecked Sendable`.
public final class NodeArena: @unchecked Sendable {
    /// The runtime's id of the node this arena serves.
    public let node: Int
    /// The physical NUMA node its memory is bound to (when memory can be bound).
    public let memoryNode: Int
    /// The arena's first byte, page-aligned.
    public let base: UnsafeMutableRawPointer
    /// Size in bytes (at least 4096).
    public let capacity: Int
    private(set) var used = 0
    private let numaAllocated: Bool
    /// The weight bytes this arena holds, counted in the runtime's ledger until the arena is freed.
    private let charge: ResidentCharge?

    init(node: Int, memoryNode: Int, capacity: Int, charge: ResidentCharge? = nil) {
        self.node = node
        self.memoryNode = memoryNode
        self.charge = charge
        let size = max(capacity, 4096)
        self.capacity = size
        if Topology.canBindMemory, let memory = numa_alloc_onnode(size, Int32(memoryNode)) {
            base = memory
            numaAllocated = true
        } else {
            var memory: UnsafeMutableRawPointer? = nil
            precondition(posix_memalign(&memory, 4096, size) == 0, "cannot allocate \(size) bytes")
            base = memory!
            numaAllocated = false
        }
    }

    deinit {
        if numaAllocated { numa_free(base, capacity) } else { free(base) }
    }

    /// Copies `tensor` in (64-byte aligned) and returns the copy.
    func copy(_ tensor: WeightTensor) -> WeightTensor {
        let offset = (used + 63) & ~63
        precondition(offset + tensor.byteCount <= capacity, "arena sized too small")
        let destination = base + offset
        destination.copyMemory(from: tensor.pointer, byteCount: tensor.byteCount)
        used = offset + tensor.byteCount
        return WeightTensor(dtype: tensor.dtype, shape: tensor.shape, owner: self, pointer: UnsafeRawPointer(destination))
    }

    /// Where the kernel says this arena's pages are: pages per physical node (negative keys are errno values, e.g.
    /// -14 EFAULT for pages never touched). Samples at most `maximumPages` pages evenly.
    public func pageNodes(maximumPages: Int = 4096) -> [Int: Int] {
        guard used > 0 else { return [:] }
        let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
        let pages = max(1, (used + pageSize - 1) / pageSize)
        let step = max(1, pages / max(1, maximumPages))
        var addresses: [UnsafeMutableRawPointer?] = stride(from: 0, to: pages, by: step).map { base + $0 * pageSize }
        var status = [Int32](repeating: 0, count: addresses.count)
        guard pg_query_page_nodes(UInt(addresses.count), &addresses, &status) == 0 else { return [-Int(errno): addresses.count] }
        var counts: [Int: Int] = [:]
        for s in status { counts[Int(s), default: 0] += 1 }
        return counts
    }

    /// Bytes in use.
    public var byteCount: Int { used }
}

/// The expert copies one node holds in a snapshot: one ``NodeArena`` per expert copy placed there.
public struct NodeShard: Sendable {
    /// The runtime's id of the node.
    public let node: Int
    /// The physical NUMA node its memory is bound to.
    public let memoryNode: Int
    /// The node's allocations, one per expert copy.
    public let arenas: [NodeArena]

    /// Bytes in use over the node's allocations.
    public var byteCount: Int { arenas.reduce(0) { $0 + $1.byteCount } }

    /// Where the kernel says the shard's pages are, pages per physical node (as ``NodeArena/pageNodes(maximumPages:)``),
    /// sampling at most about `maximumPages` pages spread over the allocations.
    public func pageNodes(maximumPages: Int = 4096) -> [Int: Int] {
        let each = max(1, maximumPages / max(1, arenas.count))
        return arenas.reduce(into: [Int: Int]()) { counts, arena in
            for (node, pages) in arena.pageNodes(maximumPages: each) { counts[node, default: 0] += pages }
        }
    }
}

/// The plan of where each expert's weights go: nodes per expert (more than one when replicated).
public struct PlacementPlan: Sendable, Equatable {
    /// `nodes[e]`: the nodes holding expert e (first = primary). Empty for an expert with no weights.
    public var nodes: [[Int]]

    /// Assigns experts to the topology's nodes under `policy`. `bytes[e]` is expert e's weight size; `load[e]`, when
    /// given, its measured share of tokens (balanced instead of bytes).
    public static func make(policy: PlacementPolicy, topology: Topology, bytes: [Int], load: [Double]?) throws(RuntimeError) -> PlacementPlan {
        let nodeCount = topology.nodes.count
        let cost: [Double] = load ?? bytes.map(Double.init)
        var nodes = [[Int]](repeating: [], count: bytes.count)
        switch policy {
        case let .isolate(node):
            guard (0..<nodeCount).contains(node) else {
                throw RuntimeError(.option, "placement isolate: expected a node in 0..<\(nodeCount), found \(node)")
            }
            for e in bytes.indices where bytes[e] > 0 { nodes[e] = [node] }
        case .distribute, .replicateHot, .inPlace:
            // Longest-processing-time first: the costliest expert goes to the least-loaded node; ties to the lower node.
            var loadPerNode = [Double](repeating: 0, count: nodeCount)
            let order = bytes.indices.filter { bytes[$0] > 0 }.sorted { cost[$0] > cost[$1] || (cost[$0] == cost[$1] && $0 < $1) }
            for e in order {
                let node = loadPerNode.indices.min { loadPerNode[$0] < loadPerNode[$1] || (loadPerNode[$0] == loadPerNode[$1] && $0 < $1) }!
                nodes[e] = [node]
                loadPerNode[node] += cost[e]
            }
            if case let .replicateHot(count) = policy {
                guard count >= 0 else { throw RuntimeError(.option, "placement replicate: expected a count >= 0, found \(count)") }
                for e in order.prefix(count) {
                    nodes[e] = [nodes[e][0]] + (0..<nodeCount).filter { $0 != nodes[e][0] }
                }
            }
        }
        return PlacementPlan(nodes: nodes)
    }

    /// The plan for a live change, stable where it can be: every expert placed in `previous` that still has weights
    /// keeps its nodes (replicas included), an expert without weights now has none, and each expert newly given
    /// weights goes to one node: the isolated node under `isolate`, else the least-loaded node by what its experts
    /// already cost there (`load[e]` when given, else bytes; ties to the lower node). Hot experts are not re-ranked:
    /// replicas are chosen when the runtime starts.
    public static func extending(_ previous: PlacementPlan, policy: PlacementPolicy, topology: Topology, bytes: [Int],
                                 load: [Double]?) throws(RuntimeError) -> PlacementPlan {
        let nodeCount = topology.nodes.count
        let cost: [Double] = load ?? bytes.map(Double.init)
        var nodes = [[Int]](repeating: [], count: bytes.count)
        var loadPerNode = [Double](repeating: 0, count: nodeCount)
        var newcomers: [Int] = []
        for e in bytes.indices where bytes[e] > 0 {
            let kept = e < previous.nodes.count ? previous.nodes[e] : []
            if !kept.isEmpty && kept.allSatisfy({ (0..<nodeCount).contains($0) }) {
                nodes[e] = kept
                for node in kept { loadPerNode[node] += cost[e] }
            } else {
                newcomers.append(e)
            }
        }
        if case let .isolate(node) = policy {
            guard (0..<nodeCount).contains(node) else {
                throw RuntimeError(.option, "placement isolate: expected a node in 0..<\(nodeCount), found \(node)")
            }
            for e in newcomers { nodes[e] = [node] }
            return PlacementPlan(nodes: nodes)
        }
        // Several newcomers (not the case for one added expert) go costliest first, as in `make`.
        newcomers.sort { cost[$0] > cost[$1] || (cost[$0] == cost[$1] && $0 < $1) }
        for e in newcomers {
            let node = loadPerNode.indices.min { loadPerNode[$0] < loadPerNode[$1] || (loadPerNode[$0] == loadPerNode[$1] && $0 < $1) }!
            nodes[e] = [node]
            loadPerNode[node] += cost[e]
        }
        return PlacementPlan(nodes: nodes)
    }
}
