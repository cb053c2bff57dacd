#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A small builder of inline SVG: the HTML report's plots are plain shapes and text, no scripts, so the report is
/// one self-contained file any browser renders.
struct SVG {
    let id: String
    let width: Double
    let height: Double
    private(set) var body: String = ""

    init(id: String, width: Double, height: Double) {
        self.id = id
        self.width = width
        self.height = height
    }

    mutating func rect(x: Double, y: Double, width: Double, height: Double, fill: String, title: String? = nil, stroke: String? = nil) {
        body += "<rect x=\"\(f(x))\" y=\"\(f(y))\" width=\"\(f(max(0, width)))\" height=\"\(f(max(0, height)))\" fill=\"\(fill)\""
        if let stroke { body += " stroke=\"\(stroke)\" stroke-width=\"0.5\"" }
        if let title { body += "><title>\(escapeHTML(title))</title></rect>" } else { body += "/>" }
    }

    mutating func line(x1: Double, y1: Double, x2: Double, y2: Double, stroke: String = "#444", width: Double = 1, dash: String? = nil) {
        body += "<line x1=\"\(f(x1))\" y1=\"\(f(y1))\" x2=\"\(f(x2))\" y2=\"\(f(y2))\" stroke=\"\(stroke)\" stroke-width=\"\(f(width))\""
        if let dash { body += " stroke-dasharray=\"\(dash)\"" }
        body += "/>"
    }

    mutating func polyline(_ points: [(Double, Double)], stroke: String, width: Double = 1.5) {
        guard !points.isEmpty else { return }
        body += "<polyline fill=\"none\" stroke=\"\(stroke)\" stroke-width=\"\(f(width))\" points=\""
        body += points.map { "\(f($0.0)),\(f($0.1))" }.joined(separator: " ")
        body += "\"/>"
    }

    mutating func circle(x: Double, y: Double, r: Double, fill: String, title: String? = nil) {
        body += "<circle cx=\"\(f(x))\" cy=\"\(f(y))\" r=\"\(f(r))\" fill=\"\(fill)\""
        if let title { body += "><title>\(escapeHTML(title))</title></circle>" } else { body += "/>" }
    }

    enum Anchor: String { case start, middle, end }

    mutating func text(_ s: String, x: Double, y: Double, size: Double = 11, anchor: Anchor = .start, fill: String = "#222",
                       rotate: Double? = nil, bold: Bool = false) {
        body += "<text x=\"\(f(x))\" y=\"\(f(y))\" font-size=\"\(f(size))\" text-anchor=\"\(anchor.rawValue)\" fill=\"\(fill)\""
        if bold { body += " font-weight=\"bold\"" }
        if let rotate { body += " transform=\"rotate(\(f(rotate)) \(f(x)) \(f(y)))\"" }
        body += ">\(escapeHTML(s))</text>"
    }

    /// A conservative width of `s` in pixels at font size `size` (sans-serif glyphs are at most about 0.6 em on
    /// average; wide ones like "m" are offset by narrow ones like "." and "1"), for keeping labels apart.
    static func textWidth(_ s: String, size: Double) -> Double { Double(s.count) * size * 0.62 }

    var rendered: String {
        "<svg id=\"\(id)\" xmlns=\"http://www.w3.org/2000/svg\" width=\"\(f(width))\" height=\"\(f(height))\" viewBox=\"0 0 \(f(width)) \(f(height))\" font-family=\"sans-serif\">\(body)</svg>"
    }

    /// A number with at most two decimals, no exponent.
    func f(_ v: Double) -> String {
        guard v.isFinite else { return "0" }
        let r = (v * 100).rounded() / 100
        if r == r.rounded() { return String(Int(r)) }
        return String(r)
    }
}

/// Escapes text for HTML and SVG content and attributes.
func escapeHTML(_ s: String) -> String {
    var out = ""
    out.reserveCapacity(s.utf8.count)
    for c in s.unicodeScalars {
        switch c {
        case "&": out += "&amp;"
        case "<": out += "&lt;"
        case ">": out += "&gt;"
        case "\"": out += "&quot;"
        default: out.unicodeScalars.append(c)
        }
    }
    return out
}

/// Colours of the report.
enum Palette {
    /// A sequential scale from near-white to dark blue, for 0...1.
    static func sequential(_ t: Double) -> String {
        let stops: [(Double, Double, Double)] = [(247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107)]
        let x = min(1, max(0, t.isFinite ? t : 0)) * Double(stops.count - 1)
        let i = min(stops.count - 2, Int(x))
        let u = x - Double(i)
        let a = stops[i], b = stops[i + 1]
        return hex(a.0 + (b.0 - a.0) * u, a.1 + (b.1 - a.1) * u, a.2 + (b.2 - a.2) * u)
    }

    static func hex(_ r: Double, _ g: Double, _ b: Double) -> String {
        func h(_ v: Double) -> String {
            let s = String(Int(min(255, max(0, v.rounded()))), radix: 16)
            return s.count == 1 ? "0" + s : s
        }
        return "#" + h(r) + h(g) + h(b)
    }

    static let phase: [String: String] = [
        "routing": "#4e79a7", "plan": "#f28e2b", "item": "#59a14f", "steal": "#e15759", "combine": "#76b7b2",
        "wait": "#d4cfcb", "queued": "#edc948", "idle": "#eeeeee", "call": "#b07aa1",
    ]
    static let accent = "#c0392b"
    static let missing = "#e8e8e8"
}

/// Axis ticks for a log-scaled range: powers of ten and their 2x and 5x.
func logTicks(low: Double, high: Double) -> [Double] {
    guard low > 0, high > low else { return [low] }
    var ticks: [Double] = []
    var decade = pow(10, floor(log10(low)))
    while decade <= high * 10 {
        for m in [1.0, 2.0, 5.0] where decade * m >= low && decade * m <= high { ticks.append(decade * m) }
        decade *= 10
    }
    return ticks
}

/// A duration in milliseconds as short text ("850 us", "12.3 ms", "1.25 s").
func formatMilliseconds(_ ms: Double) -> String {
    if ms < 1 { return "\(Int((ms * 1000).rounded())) us" }
    if ms < 100 { return "\(String(format1(ms))) ms" }
    if ms < 10_000 { return "\(Int(ms.rounded())) ms" }
    return "\(format1(ms / 1000)) s"
}

/// One decimal.
func format1(_ v: Double) -> String {
    guard v.isFinite else { return "-" }
    let r = (v * 10).rounded() / 10
    return r == r.rounded() ? String(Int(r)) + ".0" : String(r)
}

/// Two decimals.
func format2(_ v: Double) -> String {
    guard v.isFinite else { return "-" }
    let scaled = Int((abs(v) * 100).rounded())
    let frac = String(scaled % 100)
    return (v < 0 && scaled != 0 ? "-" : "") + String(scaled / 100) + "." + (frac.count == 1 ? "0" + frac : frac)
}

/// A text label's box in SVG coordinates (y grows downwards), as ``stackLabels(_:gap:)`` lays it out.
struct LabelBox: Equatable {
    var left: Double
    var right: Double
    /// The text's baseline; the box spans from `size` above it to a quarter of `size` below it (descenders).
    var baseline: Double
    var size: Double

    var top: Double { baseline - size }
    var bottom: Double { baseline + size / 4 }

    /// A box for `text` drawn at (x, baseline) with `anchor`.
    init(_ text: String, x: Double, baseline: Double, size: Double, anchor: SVG.Anchor) {
        let width = SVG.textWidth(text, size: size)
        switch anchor {
        case .start: left = x; right = x + width
        case .middle: left = x - width / 2; right = x + width / 2
        case .end: left = x - width; right = x
        }
        self.baseline = baseline
        self.size = size
    }

    func intersects(_ other: LabelBox) -> Bool {
        left < other.right && other.left < right && top < other.bottom && other.top < bottom
    }
}

/// Moves labels down until no two boxes intersect, keeping each as close to where it wants to be as it can: labels
/// are placed from the top one down, and each one that would cover a label already placed goes just below it
/// (`gap` pixels apart). Labels whose x ranges do not overlap stay where they are. Returns the boxes in the order
/// given.
func stackLabels(_ boxes: [LabelBox], gap: Double = 2) -> [LabelBox] {
    var placed: [(index: Int, box: LabelBox)] = []
    for (index, wanted) in boxes.enumerated().sorted(by: { ($0.element.baseline, $0.offset) < ($1.element.baseline, $1.offset) }) {
        var box = wanted
        // Each move goes below a placed box, so at most one move per placed box.
        while let blocker = placed.first(where: { $0.box.intersects(box) }) {
            box.baseline = blocker.box.bottom + gap + box.size
        }
        placed.append((index, box))
    }
    return placed.sorted { $0.index < $1.index }.map(\.box)
}
