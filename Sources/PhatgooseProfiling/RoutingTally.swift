/// Routing decisions counted per (layer, expert) and per pair of experts chosen for the same token: what the
/// heatmap, the imbalance figures, the co-selection matrix and the CSV are made of.
///
/// A token choosing k experts at a layer adds 1 to each of its k (layer, expert) cells and 1 to each unordered pair
/// among them (stored both ways). Slots holding -1 (padding) are skipped.
public struct RoutingTally: Sendable, Equatable {
    public let layers: Int
    public let experts: Int
    /// [layers * experts], row-major by layer.
    public private(set) var counts: [Int]
    /// [experts * experts], symmetric, zero diagonal.
    public private(set) var pairs: [Int]
    /// Token decisions tallied (one per token per layer).
    public private(set) var decisions: Int = 0

    public init(layers: Int, experts: Int) {
        self.layers = layers
        self.experts = experts
        counts = [Int](repeating: 0, count: layers * experts)
        pairs = [Int](repeating: 0, count: experts * experts)
    }

    /// Adds the choices of `tokens` tokens at `layer`: `choices` is [tokens, slots] of expert indices.
    public mutating func add(layer: Int, choices: UnsafePointer<Int32>, tokens: Int, slots: Int) {
        precondition(layer >= 0 && layer < layers, "layer out of range")
        let e = experts
        counts.withUnsafeMutableBufferPointer { cells in
            pairs.withUnsafeMutableBufferPointer { pairCells in
                let row = layer * e
                for t in 0..<tokens {
                    let base = choices + t * slots
                    for s in 0..<slots {
                        let i = Int(base[s])
                        guard i >= 0 && i < e else { continue }
                        cells[row + i] += 1
                        for s2 in (s + 1)..<slots {
                            let j = Int(base[s2])
                            guard j >= 0 && j < e && j != i else { continue }
                            pairCells[i * e + j] += 1
                            pairCells[j * e + i] += 1
                        }
                    }
                }
            }
        }
        decisions += tokens
    }

    /// Adds another tally of the same shape.
    public mutating func merge(_ other: RoutingTally) {
        precondition(other.layers == layers && other.experts == experts, "tallies of different shapes")
        for i in counts.indices { counts[i] += other.counts[i] }
        for i in pairs.indices { pairs[i] += other.pairs[i] }
        decisions += other.decisions
    }

    public func count(layer: Int, expert: Int) -> Int { counts[layer * experts + expert] }
    public func pair(_ i: Int, _ j: Int) -> Int { pairs[i * experts + j] }

    /// Assignments per expert over all layers.
    public var perExpert: [Int] {
        var totals = [Int](repeating: 0, count: experts)
        for l in 0..<layers { for e in 0..<experts { totals[e] += counts[l * experts + e] } }
        return totals
    }

    /// Assignments per layer.
    public var perLayer: [Int] { (0..<layers).map { l in counts[(l * experts)..<((l + 1) * experts)].reduce(0, +) } }

    /// The counts of one layer over the given candidate experts (in the order given).
    public func counts(layer: Int, candidates: [Int]) -> [Int] { candidates.map { counts[layer * experts + $0] } }
}
