import PhatgooseFormats

/// Per (layer, expert) token counts as CSV: `layer_index,layer,expert_index,expert,tokens,share_of_layer`, one row per
/// candidate expert of each layer (experts that do not adapt a layer are not listed), layers in model order.
public enum ExpertCountsCSV {
    public static func render(_ tally: RoutingTally, layerNames: [String], expertNames: [String], candidates: [[Int]]) -> String {
        var out = "layer_index,layer,expert_index,expert,tokens,share_of_layer\n"
        for l in 0..<tally.layers {
            let cands = l < candidates.count ? candidates[l] : Array(0..<tally.experts)
            let total = cands.reduce(0) { $0 + tally.count(layer: l, expert: $1) }
            for e in cands {
                let count = tally.count(layer: l, expert: e)
                let share = total > 0 ? Double(count) / Double(total) : 0
                let layer = l < layerNames.count ? layerNames[l] : "layer \(l)"
                let expert = e < expertNames.count ? expertNames[e] : "expert \(e)"
                out += "\(l),\(field(layer)),\(e),\(field(expert)),\(count),\(shareText(share))\n"
            }
        }
        return out
    }

    /// Writes the CSV atomically.
    public static func write(_ tally: RoutingTally, layerNames: [String], expertNames: [String], candidates: [[Int]], to path: String) throws {
        let file = try AtomicFile(path: path)
        try file.write(Array(render(tally, layerNames: layerNames, expertNames: expertNames, candidates: candidates).utf8))
        try file.commit()
    }

    /// RFC 4180 quoting when needed.
    static func field(_ s: String) -> String {
        guard s.contains(where: { $0 == "," || $0 == "\"" || $0 == "\n" || $0 == "\r" }) else { return s }
        return "\"" + s.replacingOccurrences(of: "\"", with: "\"\"") + "\""
    }

    /// Six decimals, no exponent.
    static func shareText(_ v: Double) -> String {
        let micro = Int((v * 1_000_000).rounded())
        let frac = String(micro % 1_000_000)
        return String(micro / 1_000_000) + "." + String(repeating: "0", count: 6 - frac.count) + frac
    }
}

extension String {
    fileprivate func replacingOccurrences(of target: String, with replacement: String) -> String {
        split(separator: Character(target), omittingEmptySubsequences: false).joined(separator: replacement)
    }
}
