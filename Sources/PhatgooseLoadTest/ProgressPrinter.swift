#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Shows a load test's progress on standard error: on a terminal, one line rewritten in place (`\r`) every report;
/// otherwise (a pipe, a CI log) a plain line every `plainInterval` seconds, so logs stay readable.
///
/// # Thread safety
/// Used from the thread that runs the load test only.
public final class ProgressPrinter {
    public let isTerminal: Bool
    public let plainInterval: Double
    private var lastPlain = -Double.infinity
    private var lineShown = false

    public init(isTerminal: Bool = isatty(2) != 0, plainInterval: Double = 5) {
        self.isTerminal = isTerminal
        self.plainInterval = plainInterval
    }

    /// One report.
    public func show(_ p: LoadTestProgress) {
        let text = Self.line(p)
        if isTerminal {
            write("\r\u{1B}[2K" + text)
            lineShown = true
        } else {
            // A new run (a sweep's next measurement) starts its clock again.
            if p.elapsed < lastPlain { lastPlain = -Double.infinity }
            guard p.elapsed - lastPlain >= plainInterval - 1e-6 || p.phase == .draining else { return }
            lastPlain = p.elapsed
            write(text + "\n")
        }
    }

    /// A free-form message on its own line.
    public func message(_ text: String) {
        finish()
        write(text + "\n")
    }

    /// Ends the in-place line, if any.
    public func finish() {
        if lineShown {
            write("\n")
            lineShown = false
        }
    }

    /// The progress text: phase, time, completed, current throughput and p99.
    public static func line(_ p: LoadTestProgress) -> String {
        var s = "[\(p.phase.rawValue)] \(f1(p.elapsed)) s"
        if p.phase != .warmup { s += " (measured \(f1(p.measured)) s)" }
        s += "  completed \(p.completed)  \(f1(p.requestRate)) req/s  \(Int(p.tokenRate.rounded())) tok/s  p99 \(f1(p.p99Milliseconds)) ms"
        s += "  in flight \(p.inFlight)"
        if p.backlog > 0 { s += "  backlog \(p.backlog)" }
        if p.rejected > 0 { s += "  rejected \(p.rejected)" }
        if p.failed > 0 { s += "  failed \(p.failed)" }
        return s
    }

    private static func f1(_ v: Double) -> String {
        guard v.isFinite else { return "-" }
        let scaled = Int((v * 10).rounded())
        return "\(scaled / 10).\(abs(scaled % 10))"
    }

    private func write(_ text: String) {
        _ = text.utf8CString.withUnsafeBufferPointer { Glibc.write(2, $0.baseAddress, $0.count - 1) }
    }
}

@available(*, unavailable)
extension ProgressPrinter: Sendable {}
