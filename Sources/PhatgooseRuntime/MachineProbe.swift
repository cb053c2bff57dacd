import Dispatch
import Foundation
import PhatgooseKernels
import PhatgooseRouting

/// Measures this machine's roofline in one run: peak FLOP/s from a cache-resident SGEMM on every thread at once
/// (the kernels' best instruction set, AVX-512 where the CPU has it), and memory bandwidth from a streaming copy on
/// every thread at once.
public enum MachineProbe {
    /// One measurement of the machine.
    public struct Result: Sendable {
        /// Threads that ran at once.
        public var threads: Int
        /// Best SGEMM rate of all threads together, in GFLOP/s (10^9 floating-point operations per second).
        public var peakGFLOPS: Double
        /// Best copy bandwidth of all threads together, in GB/s (10^9 bytes read plus written per second).
        public var bandwidthGBps: Double
        /// Best rate of register-only FMA chains on all threads together, in GFLOP/s: the issue limit that no F32
        /// kernel can pass (the SGEMM reaches a fraction of it).
        public var fmaPeakGFLOPS: Double
    }

    /// Best of several rounds, each `threads` workers at once.
    public static func measure(threads: Int, seconds: Double = 0.6) -> Result {
        Result(threads: threads, peakGFLOPS: peakGFLOPS(threads: threads, seconds: seconds * 0.4),
               bandwidthGBps: bandwidth(threads: threads, seconds: seconds * 0.4),
               fmaPeakGFLOPS: fmaPeakGFLOPS(threads: threads, seconds: seconds * 0.2))
    }

    static func fmaPeakGFLOPS(threads: Int, seconds: Double) -> Double {
        var best = 0.0
        let deadline = Date().addingTimeInterval(seconds)
        repeat {
            let start = DispatchTime.now().uptimeNanoseconds
            let flops = Locked(0.0)
            DispatchQueue.concurrentPerform(iterations: threads) { _ in
                let done = Kernels.fmaProbe(iterations: 200_000)
                flops.withLock { $0 += done }
            }
            let elapsed = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
            best = max(best, flops.withLock { $0 } / elapsed / 1e9)
        } while Date() < deadline
        return best
    }

    static func peakGFLOPS(threads: Int, seconds: Double) -> Double {
        let m = 192, n = 192, k = 256
        var best = 0.0
        let deadline = Date().addingTimeInterval(seconds)
        repeat {
            let reps = 20
            let start = DispatchTime.now().uptimeNanoseconds
            DispatchQueue.concurrentPerform(iterations: threads) { _ in
                // 64-byte aligned operands: the best case of the kernels' loads, so the peak is the machine's.
                // The packed-panel GEMM, the fastest the kernels have (the routing scores use it).
                let a = ScratchBuffer(capacity: m * k), b = ScratchBuffer(capacity: n * k), c = ScratchBuffer(capacity: m * n)
                let panels = ScratchBuffer(capacity: Kernels.panelFloatCount(n: n, k: k))
                a.pointer.initialize(repeating: 0.5, count: m * k)
                b.pointer.initialize(repeating: 0.25, count: n * k)
                Kernels.packPanels(b.pointer, ldb: k, n: n, k: k, into: panels.pointer)
                for _ in 0..<reps { Kernels.gemmPacked(a.pointer, lda: k, m: m, panels.pointer, n: n, k: k, into: c.pointer, ldc: n) }
            }
            let elapsed = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
            best = max(best, Double(threads * reps * 2 * m * n * k) / elapsed / 1e9)
        } while Date() < deadline
        return best
    }

    static func bandwidth(threads: Int, seconds: Double) -> Double {
        let bytesPerThread = 64 << 20
        let buffers = (0..<threads).map { _ in
            (UnsafeMutableRawPointer.allocate(byteCount: bytesPerThread, alignment: 64),
             UnsafeMutableRawPointer.allocate(byteCount: bytesPerThread, alignment: 64))
        }
        defer { for (a, b) in buffers { a.deallocate(); b.deallocate() } }
        for (a, b) in buffers {
            memset(a, 1, bytesPerThread)
            memset(b, 2, bytesPerThread)
        }
        let addresses = buffers.map { (Int(bitPattern: $0.0), Int(bitPattern: $0.1)) }
        var best = 0.0
        let deadline = Date().addingTimeInterval(seconds)
        repeat {
            let start = DispatchTime.now().uptimeNanoseconds
            DispatchQueue.concurrentPerform(iterations: threads) { i in
                memcpy(UnsafeMutableRawPointer(bitPattern: addresses[i].1)!, UnsafeRawPointer(bitPattern: addresses[i].0)!, bytesPerThread)
            }
            let elapsed = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
            // A copy reads and writes every byte.
            best = max(best, Double(2 * threads * bytesPerThread) / elapsed / 1e9)
        } while Date() < deadline
        return best
    }
}
