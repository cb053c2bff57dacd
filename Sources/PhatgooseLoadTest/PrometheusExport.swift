import Foundation
import PhatgooseFormats
import Prometheus
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The load test's metrics in Prometheus text format (swift-prometheus): a registry, the swift-metrics factory that
/// feeds it, and the two ways out, a file (written atomically, so a scraper never reads half of it) and a loopback
/// HTTP endpoint.
public final class PrometheusExport: Sendable {
    public let registry = PrometheusCollectorRegistry()

    public init() {}

    /// A swift-metrics factory recording into ``registry``, with timer buckets from 50 us to 10 s (layer calls and
    /// queue waits are far below the library's default first bucket of 5 ms).
    public var factory: PrometheusMetricsFactory {
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = [
            .microseconds(50), .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .microseconds(2500),
            .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250),
            .milliseconds(500), .seconds(1), .milliseconds(2500), .seconds(10),
        ]
        return factory
    }

    /// The exposition text.
    public func render() -> [UInt8] { registry.emitToBuffer() }

    /// Writes the exposition text to `path` atomically.
    public func write(to path: String) throws {
        let file = try AtomicFile(path: path)
        try file.write(render())
        try file.commit()
    }
}

/// A minimal HTTP/1.1 responder on 127.0.0.1 that answers `GET /metrics` (and `GET /`) with the Prometheus text, one
/// connection at a time, `Connection: close`. Loopback only: it is for a scraper on the same machine during a load
/// test, not a server.
///
/// # Thread safety
/// One thread of its own (`pg-metrics-http`) accepts and answers; `stop()` may be called from any thread, once or
/// more, and returns after that thread has closed the socket.
public final class MetricsServer: Sendable {
    /// The port bound (the one asked for, or the kernel's choice for 0).
    public let port: Int
    private let control = Control()

    /// What the server thread and `stop()` share.
    private final class Control: Sendable {
        let stopping = Atomic<Bool>(false)
        let finished = DispatchSemaphore(value: 0)
    }

    /// Binds 127.0.0.1:`port` and starts answering with `body()`.
    public init(port: Int, body: @escaping @Sendable () -> [UInt8]) throws {
        guard port >= 0 && port <= 65_535 else { throw LoadTestError(.option, "--metrics-port: expected 0 to 65535, found \(port)") }
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw LoadTestError(.io, "metrics port \(port): cannot create a socket: \(String(cString: strerror(errno)))") }
        var yes: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr = in_addr(s_addr: UInt32(0x7F00_0001).bigEndian)
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard bound == 0, listen(fd, 16) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw LoadTestError(.io, "metrics port \(port): expected to listen on 127.0.0.1:\(port), found: \(reason)")
        }
        var actual = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &actual) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        self.port = Int(UInt16(bigEndian: actual.sin_port))
        let control = self.control
        let thread = Thread {
            TemporaryFiles.blockInterruptionsInThisThread()
            Self.serve(fd, stopping: control.stopping, body: body)
            close(fd)
            control.finished.signal()
        }
        thread.name = "pg-metrics-http"
        thread.start()
    }

    deinit { stop() }

    /// Stops answering and closes the socket.
    public func stop() {
        guard !control.stopping.exchange(true, ordering: .sequentiallyConsistent) else { return }
        control.finished.wait()
    }

    private static func serve(_ fd: Int32, stopping: borrowing Atomic<Bool>, body: () -> [UInt8]) {
        while !stopping.load(ordering: .relaxed) {
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, 200) > 0 else { continue }
            let client = accept(fd, nil, nil)
            guard client >= 0 else { continue }
            var timeout = timeval(tv_sec: 2, tv_usec: 0)
            setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            setsockopt(client, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            answer(client, body: body)
            close(client)
        }
    }

    /// Reads the request head (at most 16 KiB) and answers it.
    static func answer(_ client: Int32, body: () -> [UInt8]) {
        var request: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while request.count < 16_384 {
            let n = read(client, &buffer, buffer.count)
            if n <= 0 { break }
            request += buffer[0..<n]
            if Self.hasHeadEnd(request) { break }
        }
        let head = String(decoding: request.prefix { $0 != 13 && $0 != 10 }, as: UTF8.self)
        let parts = head.split(separator: " ")
        let response: [UInt8]
        if parts.count >= 2 && parts[0] == "GET" && (parts[1] == "/metrics" || parts[1] == "/") {
            response = Self.response(status: "200 OK", type: "text/plain; version=0.0.4; charset=utf-8", body: body())
        } else if parts.count >= 2 && parts[0] != "GET" {
            response = Self.response(status: "405 Method Not Allowed", type: "text/plain; charset=utf-8", body: Array("only GET\n".utf8))
        } else {
            response = Self.response(status: "404 Not Found", type: "text/plain; charset=utf-8", body: Array("try /metrics\n".utf8))
        }
        var sent = 0
        while sent < response.count {
            let n = response[sent...].withUnsafeBytes { send(client, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { break }
            sent += n
        }
    }

    /// True once the bytes hold an empty line (the end of the request head).
    static func hasHeadEnd(_ bytes: [UInt8]) -> Bool {
        guard bytes.count >= 4 else { return false }
        for i in 0...(bytes.count - 4) where bytes[i] == 13 && bytes[i + 1] == 10 && bytes[i + 2] == 13 && bytes[i + 3] == 10 { return true }
        return false
    }

    static func response(status: String, type: String, body: [UInt8]) -> [UInt8] {
        Array("HTTP/1.1 \(status)\r\nContent-Type: \(type)\r\nContent-Length: \(body.count)\r\nConnection: close\r\n\r\n".utf8) + body
    }
}
