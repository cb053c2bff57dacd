import CNuma
import CPhatgooseSystem

/// The machine's NUMA nodes as the runtime uses them: each node's CPUs (only those this process may run on) and the
/// distances between nodes. Detected through libnuma, or given explicitly to model a 2- or 4-node machine on any box.
public struct Topology: Sendable, Equatable, CustomStringConvertible {
    /// One node: its id, its CPUs and the physical node its memory is on.
    public struct Node: Sendable, Equatable {
        /// The node id as the runtime numbers it (0-based, dense).
        public var id: Int
        /// CPUs of this node that the process may use.
        public var cpus: [Int]
        /// The physical node memory for this node is bound to (equal to `id` when detected; for a modelled node, the
        /// real node its memory lands on).
        public var memoryNode: Int
    }

    /// The nodes, in id order.
    public var nodes: [Node]
    /// `distances[i][j]`: relative distance from node i to node j (10 = local, as libnuma reports).
    public var distances: [[Int]]
    /// True when the nodes were given rather than detected.
    public var isModelled: Bool

    /// CPUs over all nodes (a CPU listed on two modelled nodes counts twice).
    public var cpuCount: Int { nodes.reduce(0) { $0 + $1.cpus.count } }

    /// Each node's CPUs and memory node on one line, with `[modelled]` appended for a modelled topology.
    public var description: String {
        nodes.map { "node \($0.id): cpus \($0.cpus.map(String.init).joined(separator: ",")) (memory on node \($0.memoryNode))" }
            .joined(separator: "; ") + (isModelled ? " [modelled]" : "")
    }

    /// The CPUs this process may run on.
    public static func allowedCPUs() -> [Int] {
        var cpus = [Int32](repeating: 0, count: 4096)
        let count = pg_allowed_cpus(&cpus, 4096)
        guard count > 0 else { return [0] }
        return cpus.prefix(Int(count)).map(Int.init)
    }

    /// The machine's topology from libnuma, restricted to the allowed CPUs; one node holding every allowed CPU when
    /// NUMA is unavailable.
    public static func detect() -> Topology {
        let allowed = Set(allowedCPUs())
        guard numa_available() >= 0 else { return single(cpus: allowed.sorted()) }
        let maxNode = Int(numa_max_node())
        var nodes: [Node] = []
        var physical: [Int] = []
        for node in 0...maxNode {
            guard let mask = numa_allocate_cpumask() else { continue }
            defer { numa_free_cpumask(mask) }
            guard numa_node_to_cpus(Int32(node), mask) == 0 else { continue }
            let cpus = allowed.sorted().filter { numa_bitmask_isbitset(mask, UInt32($0)) != 0 }
            guard !cpus.isEmpty else { continue }
            nodes.append(Node(id: nodes.count, cpus: cpus, memoryNode: node))
            physical.append(node)
        }
        guard !nodes.isEmpty else { return single(cpus: allowed.sorted()) }
        let distances = physical.map { a in physical.map { b in Int(numa_distance(Int32(a), Int32(b))) } }
        return Topology(nodes: nodes, distances: distances, isModelled: false)
    }

    static func single(cpus: [Int]) -> Topology {
        Topology(nodes: [Node(id: 0, cpus: cpus.isEmpty ? [0] : cpus, memoryNode: 0)], distances: [[10]], isModelled: false)
    }

    /// A modelled topology from a spec such as `0-1;2-3` (node 0 has CPUs 0 and 1, node 1 has 2 and 3) or `0;1`.
    /// CPUs may repeat across nodes (to model more nodes than the box has). Memory of modelled node i is bound to
    /// real node `i % realNodes`; distances are 10 local and 20 remote.
    public static func modelled(_ spec: String) throws(RuntimeError) -> Topology {
        let real = detect()
        var nodes: [Node] = []
        for (i, part) in spec.split(separator: ";", omittingEmptySubsequences: false).enumerated() {
            var cpus: [Int] = []
            for item in part.split(separator: ",") {
                let bounds = item.split(separator: "-")
                guard (1...2).contains(bounds.count), let low = Int(bounds[0]), let high = Int(bounds.last!), low >= 0, low <= high else {
                    throw RuntimeError(.option, "topology \"\(spec)\": node \(i): expected CPU lists like 0-3,6, found \"\(item)\"")
                }
                cpus.append(contentsOf: low...high)
            }
            guard !cpus.isEmpty else { throw RuntimeError(.option, "topology \"\(spec)\": node \(i): expected at least one CPU, found none") }
            let allowed = Set(allowedCPUs())
            for cpu in cpus where !allowed.contains(cpu) {
                throw RuntimeError(.option, "topology \"\(spec)\": node \(i): expected CPUs this process may use (\(allowed.sorted().map(String.init).joined(separator: ","))), found \(cpu)")
            }
            nodes.append(Node(id: i, cpus: cpus, memoryNode: real.nodes[i % real.nodes.count].memoryNode))
        }
        let distances = nodes.indices.map { a in nodes.indices.map { b in a == b ? 10 : 20 } }
        return Topology(nodes: nodes, distances: distances, isModelled: true)
    }

    /// Whether memory can really be bound to nodes here (libnuma works).
    public static var canBindMemory: Bool { numa_available() >= 0 }
}
