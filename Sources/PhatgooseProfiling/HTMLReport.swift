import PhatgooseRuntime
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The profiler's report: one self-contained HTML file (inline CSS and SVG, no scripts, nothing fetched) with
///
/// - `heatmap`: tokens per expert per layer (each cell is the expert's share of the layer's assignments);
/// - `latency-histogram` and `latency-cdf`: the request latency distribution;
/// - `worker-timeline`: a window of the trace, one lane per participant, and `worker-utilisation` over the run;
/// - `phase-breakdown`: where each participant's time went;
/// - `imbalanced-layers`: the layers whose busiest expert is furthest above the mean;
/// - `co-selection`: how often experts i and j are chosen for the same token.
///
/// Each is an `<svg>` with that `id`, inside a `<section>` of the same name.
public struct HTMLReport: Sendable {
    public var title: String
    /// Headline facts, shown as a table at the top.
    public var facts: [(String, String)]
    public var layerNames: [String]
    public var expertNames: [String]
    /// Candidate experts of each layer (the experts that adapt it).
    public var candidates: [[Int]]
    public var tally: RoutingTally
    public var latency: LatencyHistogram
    /// Phase sums over the measured window, and the window's length.
    public var phases: PhaseTotals
    public var wallNanoseconds: UInt64
    public var participantNodes: [Int]
    public var participantCPUs: [Int?]
    /// Trace events (for the timeline) and how many the ring dropped.
    public var trace: [TraceRecord]
    public var droppedEvents: Int

    public init(title: String, facts: [(String, String)], layerNames: [String], expertNames: [String], candidates: [[Int]],
                tally: RoutingTally, latency: LatencyHistogram, phases: PhaseTotals, wallNanoseconds: UInt64,
                participantNodes: [Int], participantCPUs: [Int?], trace: [TraceRecord], droppedEvents: Int) {
        self.title = title
        self.facts = facts
        self.layerNames = layerNames
        self.expertNames = expertNames
        self.candidates = candidates
        self.tally = tally
        self.latency = latency
        self.phases = phases
        self.wallNanoseconds = wallNanoseconds
        self.participantNodes = participantNodes
        self.participantCPUs = participantCPUs
        self.trace = trace
        self.droppedEvents = droppedEvents
    }

    /// The ids of the plots, in page order.
    public static let sections = ["heatmap", "latency-histogram", "latency-cdf", "worker-timeline", "worker-utilisation",
                                  "phase-breakdown", "imbalanced-layers", "co-selection"]

    public func render() -> String {
        var html = """
            <!DOCTYPE html>
            <html lang="en"><head><meta charset="utf-8"><title>\(escapeHTML(title))</title>
            <style>
            body { font-family: sans-serif; margin: 24px; color: #222; background: #fff; max-width: 1200px; }
            h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
            table { border-collapse: collapse; font-size: 13px; } td, th { padding: 2px 10px 2px 0; text-align: left; }
            th { color: #555; font-weight: normal; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
            p.note { color: #555; font-size: 13px; max-width: 900px; }
            .legend span { display: inline-block; margin-right: 14px; font-size: 12px; }
            .legend i { display: inline-block; width: 11px; height: 11px; margin-right: 4px; vertical-align: -1px; }
            </style></head><body>
            <h1>\(escapeHTML(title))</h1>

            """
        html += "<table class=\"facts\">"
        for (key, value) in facts { html += "<tr><th>\(escapeHTML(key))</th><td>\(escapeHTML(value))</td></tr>" }
        if droppedEvents > 0 {
            html += "<tr><th>trace</th><td>the ring was full: \(droppedEvents) older events were dropped (the timeline shows the most recent ones)</td></tr>"
        }
        html += "</table>\n"
        html += section("heatmap", "Tokens per expert per layer",
                        "Each row is a routed layer in model order, each column an expert; the colour is the expert's share of the layer's token assignments (darkest = the largest share in the run). Grey: the expert does not adapt the layer.",
                        heatmap())
        html += section("latency-histogram", "Request latency: histogram", "End-to-end latency of measured requests, logarithmic buckets.", latencyHistogram())
        html += section("latency-cdf", "Request latency: cumulative distribution", "Fraction of requests at or below each latency; markers at p50, p90, p99 and p99.9.", latencyCDF())
        html += section("worker-timeline", "Worker timeline", "The last layer calls of the trace, one lane per participant (0 is the calling thread). Grey: waiting inside a call.", timeline())
        html += section("worker-utilisation", "Worker utilisation", "Share of the measured wall time each participant spent computing (routing, plan, expert items, steals, combine).", utilisation())
        html += section("phase-breakdown", "Phase breakdown", "Where each participant's wall time went over the measured window.", phaseBreakdown())
        html += section("imbalanced-layers", "Most imbalanced layers", "Layers whose busiest expert took the most above the mean of the layer's candidates: max/mean, with (max - mean)/mean in brackets.", imbalancedLayers())
        html += section("co-selection", "Expert co-selection", "How often experts i and j are chosen for the same token (all layers); the colour is the pair's count relative to the most frequent pair.", coSelection())
        html += "</body></html>\n"
        return html
    }

    private func section(_ id: String, _ heading: String, _ note: String, _ content: String) -> String {
        "<section id=\"section-\(id)\"><h2>\(escapeHTML(heading))</h2><p class=\"note\">\(escapeHTML(note))</p>\n\(content)\n</section>\n"
    }

    private func legend(_ kinds: [String]) -> String {
        "<div class=\"legend\">" + kinds.map { "<span><i style=\"background:\(Palette.phase[$0] ?? "#999")\"></i>\($0)</span>" }.joined() + "</div>"
    }

    // MARK: Heatmap

    func heatmap() -> String {
        let layers = tally.layers, experts = tally.experts
        let labelWidth = 300.0, top = 60.0
        let cellW = max(3, min(40, 860 / Double(max(1, experts))))
        let cellH = max(2, min(12, 1300 / Double(max(1, layers))))
        var svg = SVG(id: "heatmap", width: labelWidth + cellW * Double(experts) + 20, height: top + cellH * Double(layers) + 30)
        var maxShare = 0.0
        var shares = [Double](repeating: -1, count: layers * experts)
        for l in 0..<layers {
            let cands = l < candidates.count ? candidates[l] : Array(0..<experts)
            let total = cands.reduce(0) { $0 + tally.count(layer: l, expert: $1) }
            for e in cands where total > 0 {
                let share = Double(tally.count(layer: l, expert: e)) / Double(total)
                shares[l * experts + e] = share
                maxShare = max(maxShare, share)
            }
            for e in cands where total == 0 { shares[l * experts + e] = 0 }
        }
        let titled = layers * experts <= 20_000
        for l in 0..<layers {
            for e in 0..<experts {
                let share = shares[l * experts + e]
                let x = labelWidth + Double(e) * cellW, y = top + Double(l) * cellH
                let fill = share < 0 ? Palette.missing : Palette.sequential(maxShare > 0 ? share / maxShare : 0)
                let title = titled ? "\(name(layer: l)) / \(name(expert: e)): \(tally.count(layer: l, expert: e)) tokens" + (share >= 0 ? " (\(format1(100 * share))%)" : ", not a candidate") : nil
                svg.rect(x: x, y: y, width: cellW, height: cellH, fill: fill, title: title)
            }
        }
        let layerStep = max(1, Int((12 / cellH).rounded(.up)))
        for l in stride(from: 0, to: layers, by: layerStep) {
            svg.text(name(layer: l), x: labelWidth - 6, y: top + Double(l) * cellH + cellH / 2 + 3, size: min(10, max(7, cellH * Double(layerStep) - 2)), anchor: .end)
        }
        let expertStep = max(1, Int((12 / cellW).rounded(.up)))
        for e in stride(from: 0, to: experts, by: expertStep) {
            svg.text(String(e), x: labelWidth + Double(e) * cellW + cellW / 2, y: top - 6, size: 9, anchor: .start, rotate: -60)
        }
        svg.text("expert index", x: labelWidth, y: 12, size: 11)
        svg.text("darkest = \(format1(100 * maxShare))% of a layer's assignments", x: labelWidth + 120, y: 12, size: 11, fill: "#555")
        return svg.rendered
    }

    // MARK: Latency

    func latencyHistogram() -> String {
        let buckets = latency.logarithmicBuckets(40)
        var svg = SVG(id: "latency-histogram", width: 900, height: 300)
        let left = 60.0, right = 880.0, top = 20.0, bottom = 250.0
        guard let first = buckets.first, let last = buckets.last else {
            svg.text("no completed requests", x: left, y: 120)
            return svg.rendered
        }
        let maxCount = Double(buckets.map(\.count).max() ?? 1)
        let low = max(1e-3, latency.minMilliseconds), high = max(last.upperMilliseconds, low * 1.01)
        func x(_ ms: Double) -> Double { left + (right - left) * log(max(ms, low) / low) / log(high / low) }
        var lower = low
        for b in buckets {
            let height = (bottom - top) * Double(b.count) / maxCount
            svg.rect(x: x(lower), y: bottom - height, width: max(1, x(b.upperMilliseconds) - x(lower) - 1), height: height,
                     fill: "#4e79a7", title: "\(formatMilliseconds(lower)) to \(formatMilliseconds(b.upperMilliseconds)): \(b.count) requests")
            lower = b.upperMilliseconds
        }
        _ = first
        axes(&svg, left: left, right: right, top: top, bottom: bottom, ticks: logTicks(low: low, high: high).map { (x($0), formatMilliseconds($0)) })
        svg.text("requests", x: 14, y: (top + bottom) / 2, size: 11, anchor: .middle, rotate: -90)
        svg.text(String(Int(maxCount)), x: left - 6, y: top + 4, size: 10, anchor: .end)
        svg.text("end-to-end latency (log scale)", x: (left + right) / 2, y: 292, size: 11, anchor: .middle)
        return svg.rendered
    }

    func latencyCDF() -> String {
        var svg = SVG(id: "latency-cdf", width: 900, height: 300)
        let left = 60.0, right = 880.0, top = 20.0, bottom = 250.0
        let points = latency.cumulativeDistribution()
        guard let last = points.last else {
            svg.text("no completed requests", x: left, y: 120)
            return svg.rendered
        }
        let low = max(1e-3, points[0].milliseconds * 0.9), high = max(last.milliseconds * 1.05, low * 1.01)
        func x(_ ms: Double) -> Double { left + (right - left) * log(max(ms, low) / low) / log(high / low) }
        func y(_ f: Double) -> Double { bottom - (bottom - top) * f }
        for f in [0.25, 0.5, 0.75, 1.0] {
            svg.line(x1: left, y1: y(f), x2: right, y2: y(f), stroke: "#e4e4e4")
            svg.text("\(Int(f * 100))%", x: left - 6, y: y(f) + 4, size: 10, anchor: .end)
        }
        var steps: [(Double, Double)] = [(x(low), y(0))]
        var previous = 0.0
        for p in points {
            steps.append((x(p.milliseconds), y(previous)))
            steps.append((x(p.milliseconds), y(p.fraction)))
            previous = p.fraction
        }
        steps.append((right, y(1)))
        svg.polyline(steps, stroke: "#4e79a7", width: 2)
        // Each label sits up and to the left of its marker; labels that would overlap (percentiles close together,
        // as p99 and p99.9 often are) are stacked downwards, with a leader line back to the marker.
        let markers = [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9)].map { label, pct in
            (label: label, ms: latency.milliseconds(atPercentile: pct), fraction: pct / 100)
        }
        let texts = markers.map { "\($0.label) \(formatMilliseconds($0.ms))" }
        let wanted = zip(markers, texts).map { marker, text in
            LabelBox(text, x: x(marker.ms) - 6, baseline: y(marker.fraction) - 6, size: 10, anchor: .end)
        }
        let boxes = stackLabels(wanted)
        for (i, marker) in markers.enumerated() {
            let mx = x(marker.ms), my = y(marker.fraction)
            svg.circle(x: mx, y: my, r: 3.5, fill: Palette.accent, title: "\(marker.label): \(formatMilliseconds(marker.ms))")
            if boxes[i].baseline != wanted[i].baseline {
                svg.line(x1: boxes[i].right + 1, y1: boxes[i].baseline - 3, x2: mx - 3, y2: my, stroke: Palette.accent, width: 0.5)
            }
            svg.text(texts[i], x: boxes[i].right, y: boxes[i].baseline, size: 10, anchor: .end, fill: Palette.accent)
        }
        axes(&svg, left: left, right: right, top: top, bottom: bottom, ticks: logTicks(low: low, high: high).map { (x($0), formatMilliseconds($0)) })
        svg.text("end-to-end latency (log scale)", x: (left + right) / 2, y: 292, size: 11, anchor: .middle)
        return svg.rendered
    }

    private func axes(_ svg: inout SVG, left: Double, right: Double, top: Double, bottom: Double, ticks: [(Double, String)]) {
        svg.line(x1: left, y1: bottom, x2: right, y2: bottom)
        svg.line(x1: left, y1: top, x2: left, y2: bottom)
        for (x, label) in ticks {
            svg.line(x1: x, y1: bottom, x2: x, y2: bottom + 4)
            svg.text(label, x: x, y: bottom + 16, size: 10, anchor: .middle)
        }
    }

    // MARK: Workers

    /// The trace window the timeline shows: the last 24 layer calls (at most 250 ms), or the last events.
    func timelineWindow() -> (start: UInt64, end: UInt64)? {
        let calls = trace.filter { $0.kind == .call }.sorted { $0.start < $1.start }
        if let last = calls.last {
            let first = calls[max(0, calls.count - 24)]
            return (max(first.start, last.end > 250_000_000 ? last.end - 250_000_000 : 0), last.end)
        }
        guard let end = trace.map(\.end).max(), let start = trace.map(\.start).min() else { return nil }
        return (max(start, end > 50_000_000 ? end - 50_000_000 : 0), end)
    }

    func timeline() -> String {
        let participants = max(participantNodes.count, (trace.map { Int($0.worker) }.max() ?? -1) + 1, 1)
        let laneH = 26.0, left = 150.0, right = 880.0, top = 10.0
        var svg = SVG(id: "worker-timeline", width: 900, height: top + laneH * Double(participants + 1) + 40)
        guard let window = timelineWindow(), window.end > window.start else {
            svg.text("no trace events (run with tracing on: phatgoose profile)", x: 20, y: 30)
            return svg.rendered
        }
        let span = Double(window.end - window.start)
        func x(_ t: UInt64) -> Double { left + (right - left) * Double(min(max(t, window.start), window.end) - window.start) / span }
        var events = trace.filter { $0.end >= window.start && $0.start <= window.end && $0.kind != .queued }
        if !events.contains(where: { $0.kind == .wait }) { events += ChromeTrace.derivedWaits(events) }
        for p in 0..<participants {
            let y = top + Double(p) * laneH
            svg.rect(x: left, y: y + 3, width: right - left, height: laneH - 6, fill: "#fafafa", stroke: "#ddd")
            let cpu = p < participantCPUs.count ? participantCPUs[p].map { " cpu \($0)" } ?? "" : ""
            let node = p < participantNodes.count ? " node \(participantNodes[p])" : ""
            svg.text(participantLabel(p, pool: participantNodes.count) + "\(node)\(cpu)", x: left - 8, y: y + laneH / 2 + 4, size: 11, anchor: .end)
        }
        // Calls as thin bars above their lane (the caller's), then phases.
        for r in events.sorted(by: { $0.start < $1.start }) where Int(r.worker) < participants {
            let y = top + Double(r.worker) * laneH
            let kind = r.kind.rawValue
            let label = r.kind == .item || r.kind == .steal ? "expert \(r.expert), \(r.rows) rows" : kind
            let title = "\(label) (\(name(layer: Int(r.layer)))): \(formatMilliseconds(Double(r.end - r.start) / 1e6))"
            if r.kind == .call {
                svg.rect(x: x(r.start), y: y + 3, width: max(0.5, x(r.end) - x(r.start)), height: 3, fill: Palette.phase["call"]!, title: title)
            } else {
                svg.rect(x: x(r.start), y: y + 7, width: max(0.5, x(r.end) - x(r.start)), height: laneH - 12, fill: Palette.phase[kind] ?? "#999", title: title)
            }
        }
        let axisY = top + Double(participants) * laneH + 8
        svg.line(x1: left, y1: axisY, x2: right, y2: axisY)
        for i in 0...4 {
            let t = span * Double(i) / 4
            let xi = left + (right - left) * Double(i) / 4
            svg.line(x1: xi, y1: axisY, x2: xi, y2: axisY + 4)
            svg.text(formatMilliseconds(t / 1e6), x: xi, y: axisY + 16, size: 10, anchor: .middle)
        }
        return svg.rendered + legend(["routing", "plan", "item", "steal", "combine", "wait", "call"])
    }

    func utilisation() -> String {
        let rows = phases.participants.count
        let barH = 22.0, left = 150.0, right = 780.0
        var svg = SVG(id: "worker-utilisation", width: 900, height: Double(rows) * barH + 30)
        let wall = Double(max(1, wallNanoseconds))
        for (p, totals) in phases.participants.enumerated() {
            let share = min(1, Double(totals.busyNanoseconds) / wall)
            let y = Double(p) * barH + 4
            svg.rect(x: left, y: y + 3, width: right - left, height: barH - 6, fill: "#f0f0f0")
            svg.rect(x: left, y: y + 3, width: (right - left) * share, height: barH - 6, fill: "#59a14f",
                     title: "\(format1(100 * share))% busy, \(totals.itemRows) item rows")
            let cpu = p < participantCPUs.count ? participantCPUs[p].map { " cpu \($0)" } ?? "" : ""
            svg.text(participantLabel(p, pool: participantNodes.count) + cpu, x: left - 8, y: y + barH / 2 + 4, size: 11, anchor: .end)
            svg.text("\(format1(100 * share))%", x: right + 8, y: y + barH / 2 + 4, size: 11)
        }
        let rowsImbalance = LoadImbalance(counts: phases.participants.map(\.itemRows))
        svg.text("item rows per participant: max/mean \(format2(rowsImbalance.maxOverMean))", x: left, y: Double(rows) * barH + 22, size: 11, fill: "#555")
        return svg.rendered
    }

    func phaseBreakdown() -> String {
        let kinds: [RuntimeEvent.Kind] = [.routing, .plan, .item, .steal, .combine]
        let rows = phases.participants.count
        let barH = 24.0, left = 150.0, right = 860.0
        var svg = SVG(id: "phase-breakdown", width: 900, height: Double(rows) * barH + 10)
        let wall = Double(max(1, wallNanoseconds))
        for (p, totals) in phases.participants.enumerated() {
            var x = left
            let y = Double(p) * barH + 4
            for kind in kinds {
                let w = (right - left) * min(1, Double(totals[kind]) / wall)
                svg.rect(x: x, y: y + 3, width: w, height: barH - 6, fill: Palette.phase[kind.rawValue]!,
                         title: "\(kind.rawValue): \(formatMilliseconds(Double(totals[kind]) / 1e6)) (\(format1(100 * Double(totals[kind]) / wall))%)")
                x += w
            }
            svg.rect(x: x, y: y + 3, width: max(0, right - x), height: barH - 6, fill: Palette.phase["idle"]!, title: "not computing (idle, spinning or outside calls)")
            svg.text(participantLabel(p, pool: participantNodes.count), x: left - 8, y: y + barH / 2 + 4, size: 11, anchor: .end)
        }
        var table = "<table><tr><th>phase</th>" + phases.participants.indices.map { "<th>\(participantLabel($0, pool: participantNodes.count)) ms</th>" }.joined() + "<th>per layer call</th></tr>"
        let calls = max(1, phases.calls)
        for kind in kinds {
            table += "<tr><td>\(kind.rawValue)</td>"
            var sum: UInt64 = 0
            for totals in phases.participants {
                sum += totals[kind]
                table += "<td class=\"num\">\(format1(Double(totals[kind]) / 1e6))</td>"
            }
            table += "<td class=\"num\">\(formatMilliseconds(Double(sum) / 1e6 / Double(calls)))</td></tr>"
        }
        table += "<tr><td>queued for the executor</td><td class=\"num\">\(format1(Double(phases.queuedNanoseconds) / 1e6))</td>"
            + String(repeating: "<td></td>", count: max(0, phases.participants.count - 1))
            + "<td class=\"num\">\(formatMilliseconds(Double(phases.queuedNanoseconds) / 1e6 / Double(calls)))</td></tr></table>"
        return svg.rendered + legend(kinds.map(\.rawValue) + ["idle"]) + table
    }

    // MARK: Routing

    /// Layers by imbalance over their candidates, worst first.
    public func imbalanceRanking() -> [(layer: Int, imbalance: LoadImbalance)] {
        (0..<tally.layers).map { l in
            (l, LoadImbalance(counts: tally.counts(layer: l, candidates: l < candidates.count ? candidates[l] : Array(0..<tally.experts))))
        }.filter { $0.1.total > 0 }.sorted { $0.1.maxOverMean > $1.1.maxOverMean }
    }

    func imbalancedLayers() -> String {
        let worst = Array(imbalanceRanking().prefix(15))
        let barH = 22.0, left = 340.0, right = 800.0
        var svg = SVG(id: "imbalanced-layers", width: 900, height: Double(max(1, worst.count)) * barH + 30)
        guard let top = worst.first else {
            svg.text("no routed tokens", x: 20, y: 20)
            return svg.rendered
        }
        let scale = max(1.0, top.imbalance.maxOverMean)
        for (i, entry) in worst.enumerated() {
            let y = Double(i) * barH + 4
            let w = (right - left) * entry.imbalance.maxOverMean / scale
            svg.rect(x: left, y: y + 3, width: w, height: barH - 6, fill: "#e15759",
                     title: "busiest: \(name(expert: entry.imbalance.argmax >= 0 && entry.layer < candidates.count ? candidates[entry.layer][entry.imbalance.argmax] : entry.imbalance.argmax))")
            svg.text(name(layer: entry.layer), x: left - 8, y: y + barH / 2 + 4, size: 10, anchor: .end)
            svg.text("\(format2(entry.imbalance.maxOverMean)) (\(format2(entry.imbalance.excessOverMean)))", x: left + w + 6, y: y + barH / 2 + 4, size: 11)
        }
        let meanLine = left + (right - left) / scale
        svg.line(x1: meanLine, y1: 0, x2: meanLine, y2: Double(worst.count) * barH + 8, stroke: "#444", dash: "3,3")
        svg.text("balanced (1.0)", x: meanLine, y: Double(worst.count) * barH + 22, size: 10, anchor: .middle, fill: "#555")
        return svg.rendered
    }

    func coSelection() -> String {
        let e = tally.experts
        let left = 60.0, top = 50.0
        let cell = max(3, min(28, 760 / Double(max(1, e))))
        var svg = SVG(id: "co-selection", width: left + cell * Double(e) + 40, height: top + cell * Double(e) + 20)
        let maxPair = Double(tally.pairs.max() ?? 0)
        let titled = e * e <= 10_000
        for i in 0..<e {
            for j in 0..<e {
                let count = tally.pair(i, j)
                let fill = i == j ? Palette.missing : Palette.sequential(maxPair > 0 ? Double(count) / maxPair : 0)
                svg.rect(x: left + Double(j) * cell, y: top + Double(i) * cell, width: cell, height: cell, fill: fill,
                         title: titled && i != j ? "\(name(expert: i)) with \(name(expert: j)): \(count) tokens" : nil)
            }
        }
        let step = max(1, Int((12 / cell).rounded(.up)))
        for i in stride(from: 0, to: e, by: step) {
            svg.text(String(i), x: left - 6, y: top + Double(i) * cell + cell / 2 + 4, size: 9, anchor: .end)
            svg.text(String(i), x: left + Double(i) * cell + cell / 2, y: top - 6, size: 9, anchor: .start, rotate: -60)
        }
        svg.text("expert index (rows and columns); darkest = \(Int(maxPair)) tokens", x: left, y: 12, size: 11)
        return svg.rendered
    }

    private func name(layer: Int) -> String { layer >= 0 && layer < layerNames.count ? layerNames[layer] : "layer \(layer)" }
    private func name(expert: Int) -> String { expert >= 0 && expert < expertNames.count ? "\(expert) \(expertNames[expert])" : "expert \(expert)" }
}
