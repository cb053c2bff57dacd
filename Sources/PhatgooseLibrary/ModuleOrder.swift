/// Model order of module names: dot-separated parts compared in turn, numbers numerically (`block.2` before
/// `block.10`), known names by rank, other parts by bytes. The known ranks put encoders before decoders and a
/// T5 block's projections in execution order (q, k, v, o; wi, wi_0, wi_1, wo), so a walk in this order follows a
/// forward pass.
public enum ModuleOrder {
    static let knownRanks: [String: Int] = [
        "embed": 0, "embeddings": 0, "encoder": 1, "decoder": 2, "lm_head": 3,
        "q": 0, "q_proj": 0, "query": 0, "k": 1, "k_proj": 1, "key": 1, "v": 2, "v_proj": 2, "value": 2,
        "o": 3, "o_proj": 3, "out_proj": 3, "dense": 3,
        "wi": 4, "wi_0": 4, "gate_proj": 4, "wi_1": 5, "up_proj": 5, "wo": 6, "down_proj": 6,
    ]

    /// True when `a` comes before `b` in model order.
    public static func precedes(_ a: String, _ b: String) -> Bool {
        let pa = a.split(separator: ".", omittingEmptySubsequences: false)
        let pb = b.split(separator: ".", omittingEmptySubsequences: false)
        for (x, y) in zip(pa, pb) where x != y {
            let kx = key(x), ky = key(y)
            if (kx.kind, kx.value) != (ky.kind, ky.value) { return (kx.kind, kx.value) < (ky.kind, ky.value) }
            return Array(x.utf8).lexicographicallyPrecedes(Array(y.utf8))
        }
        return pa.count < pb.count
    }

    /// Numbers first (by value), then known names (by rank), then other names; ties broken by bytes. A total order.
    private static func key(_ part: Substring) -> (kind: Int, value: Int) {
        if let number = Int(part), number >= 0 { return (0, number) }
        if let rank = knownRanks[String(part)] { return (1, rank) }
        return (2, 0)
    }

    /// `names` in model order.
    public static func sorted(_ names: [String]) -> [String] { names.sorted(by: precedes) }
}
