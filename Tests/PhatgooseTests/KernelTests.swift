import CPhatgooseKernels
import Foundation
import PhatgooseKernels
import PhatgooseRouting
import Testing

/// Deterministic pseudo-random floats in [-1, 1).
func randomFloats(_ count: Int, seed: UInt64) -> [Float] {
    var state = seed &+ 0x9E37_79B9_7F4A_7C15
    return (0..<count).map { _ in
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        return Float(Int32(truncatingIfNeeded: state >> 32)) / Float(1 << 31)
    }
}

/// Whether this CPU runs the AVX-512 kernels. Tests that compare them with the AVX2 ones are enabled only then: on
/// another CPU they would compare nothing, so they are reported as skipped rather than passing without a check.
let hasAVX512 = Kernels.bestISA == .avx512

/// Runs `body` once per instruction set this CPU supports, restoring the best one afterwards.
func forEachISA(_ body: (Kernels.ISA) throws -> Void) rethrows {
    defer { Kernels.setThreadISA(nil) }
    for isa in Kernels.ISA.allCases where Kernels.setThreadISA(isa) {
        try body(isa)
    }
}

/// The worst error of `c` [m, n] against alpha * A Bᵀ computed in double, for A [m, k] and B [n, k]; relative to
/// max(1, |reference|) when `relative`, else absolute.
func worstProductError(_ c: [Float], _ a: [Float], _ b: [Float], m: Int, n: Int, k: Int, alpha: Double = 1, relative: Bool) -> Double {
    var worst = 0.0
    for i in 0..<m {
        for j in 0..<n {
            var sum = 0.0
            for t in 0..<k { sum += Double(a[i * k + t]) * Double(b[j * k + t]) }
            let error = abs(Double(c[i * n + j]) - alpha * sum)
            worst = max(worst, relative ? error / max(1, abs(sum)) : error)
        }
    }
    return worst
}

@Suite("kernels", .serialized)
struct KernelTests {
    @Test("gemm_nt matches a double-precision reference", arguments: [(1, 1, 1), (3, 5, 17), (13, 7, 64), (64, 36, 2048), (5, 166, 100), (7, 9, 8209)])
    func gemm(_ shape: (Int, Int, Int)) {
        let (m, n, k) = shape
        let a = randomFloats(m * k, seed: 1), b = randomFloats(n * k, seed: 2)
        forEachISA { isa in
            var c = [Float](repeating: .nan, count: m * n)
            Kernels.gemmNT(a, lda: k, m: m, b, ldb: k, n: n, k: k, alpha: 0.5, into: &c, ldc: n)
            let worst = worstProductError(c, a, b, m: m, n: n, k: k, alpha: 0.5, relative: true)
            #expect(worst < 1e-5, "\(isa): worst relative error \(worst)")
        }
    }

    @Test("gemm_nt, shrink and expand are right at every tile shape and edge (1-7 rows, 1-17 columns, k tails)")
    func everyTileShape() {
        let k = 37, rank = 3
        let a = randomFloats(7 * k, seed: 12), b = randomFloats(17 * k, seed: 13)
        forEachISA { isa in
            for m in 1...7 {
                for n in 1...17 {
                    var c = [Float](repeating: .nan, count: m * n)
                    Kernels.gemmNT(a, lda: k, m: m, b, ldb: k, n: n, k: k, into: &c, ldc: n)
                    let worst = worstProductError(c, a, b, m: m, n: n, k: k, relative: false)
                    #expect(worst < 1e-5, "\(isa): gemm \(m)x\(n)x\(k): worst error \(worst)")
                    // Expand over n * 9 columns: full vectors, partial vectors and the scalar or masked tail.
                    let width = n * 9
                    let h = Array(a[0..<(m * rank)]), bt = randomFloats(rank * width, seed: UInt64(n))
                    var y = [Float](repeating: .nan, count: m * width)
                    bt.withUnsafeBytes { raw in
                        Kernels.loraExpand(h, count: m, rank: rank, bTransposed: raw.baseAddress!, bDType: 0, outWidth: width, into: &y, ldy: width)
                    }
                    let b = (0..<(width * rank)).map { bt[($0 % rank) * width + $0 / rank] }  // B [width, rank]
                    let worstY = worstProductError(y, h, b, m: m, n: width, k: rank, relative: false)
                    #expect(worstY < 1e-5, "\(isa): expand \(m)x\(rank)x\(width): worst error \(worstY)")
                }
            }
        }
    }

    @Test("the packed-panel GEMM matches a double-precision reference; panels computed alone give the same bits",
          arguments: [(1, 1, 1), (3, 5, 17), (13, 7, 64), (12, 16, 129), (25, 33, 203), (7, 166, 300), (64, 36, 2048)])
    func packedGemm(_ shape: (Int, Int, Int)) {
        let (m, n, k) = shape
        let a = randomFloats(m * k, seed: 16), b = randomFloats(n * k, seed: 17)
        let panels = ScratchBuffer(capacity: Kernels.panelFloatCount(n: n, k: k))
        Kernels.packPanels(b, ldb: k, n: n, k: k, into: panels.pointer)
        forEachISA { isa in
            var c = [Float](repeating: .nan, count: m * n)
            Kernels.gemmPacked(a, lda: k, m: m, panels.pointer, n: n, k: k, alpha: 0.5, into: &c, ldc: n)
            let worst = worstProductError(c, a, b, m: m, n: n, k: k, alpha: 0.5, relative: true)
            #expect(worst < 1e-5, "\(isa): worst relative error \(worst)")
            // Each panel alone, and each row alone, reproduce the whole call bit for bit.
            var pieces = [Float](repeating: .nan, count: m * n)
            for row in 0..<m {
                for p0 in stride(from: 0, to: n, by: Kernels.panelWidth) {
                    let width = min(Kernels.panelWidth, n - p0)
                    a.withUnsafeBufferPointer { rows in
                        pieces.withUnsafeMutableBufferPointer { out in
                            Kernels.gemmPacked(rows.baseAddress! + row * k, lda: k, m: 1, UnsafePointer(panels.pointer + p0 * k), n: width, k: k,
                                               alpha: 0.5, into: out.baseAddress! + row * n + p0, ldc: n)
                        }
                    }
                }
            }
            #expect(pieces == c, "\(isa): a row or panel computed alone differs from the whole call")
        }
    }

    // Skipped, not passed, on a CPU without AVX-512 (see `hasAVX512`).
    @Test("the packed-panel GEMM gives the same bits under AVX2 and AVX-512", .enabled(if: hasAVX512, "this CPU has no AVX-512 kernels to compare"),
          arguments: [(1, 1, 1), (13, 7, 64), (25, 33, 203), (7, 166, 300), (64, 36, 2048)])
    func packedGemmAcrossISAs(_ shape: (Int, Int, Int)) throws {
        let (m, n, k) = shape
        let a = randomFloats(m * k, seed: 16), b = randomFloats(n * k, seed: 17)
        let panels = ScratchBuffer(capacity: Kernels.panelFloatCount(n: n, k: k))
        Kernels.packPanels(b, ldb: k, n: n, k: k, into: panels.pointer)
        var byISA: [Kernels.ISA: [Float]] = [:]
        forEachISA { isa in
            var c = [Float](repeating: .nan, count: m * n)
            Kernels.gemmPacked(a, lda: k, m: m, panels.pointer, n: n, k: k, alpha: 0.5, into: &c, ldc: n)
            byISA[isa] = c
        }
        let avx2 = try #require(byISA[.avx2]), avx512 = try #require(byISA[.avx512])
        #expect(avx2 == avx512, "AVX2 and AVX-512 packed GEMMs differ")
    }

    @Test("adding several rows in one pass gives the bits of adding them one by one, in order", arguments: [1, 2, 3, 8])
    func addRows(_ count: Int) {
        let width = 37
        let rows = (0..<count).map { randomFloats(width, seed: UInt64(30 + $0)).map { $0 * Float(1 << ($0 > 0 ? 10 : 0)) } }
        let start = randomFloats(width, seed: 29)
        forEachISA { isa in
            var oneByOne = start
            for row in rows { Kernels.add(row, into: &oneByOne, count: width) }
            var fused = start
            let copies = rows.map { row -> UnsafeMutablePointer<Float> in
                let p = UnsafeMutablePointer<Float>.allocate(capacity: width)
                p.initialize(from: row, count: width)
                return p
            }
            defer { copies.forEach { $0.deallocate() } }
            var pointers: [UnsafePointer<Float>?] = copies.map { UnsafePointer($0) }
            fused.withUnsafeMutableBufferPointer { y in
                Kernels.addRows(&pointers, rowCount: count, into: y.baseAddress!, width: width)
            }
            #expect(fused == oneByOne, "\(isa): \(count) rows")
        }
    }

    // Skipped, not passed, on a CPU without AVX-512 (see `hasAVX512`).
    @Test("layer norm gives the same bits under AVX2 and AVX-512 (the same double partial sums)",
          .enabled(if: hasAVX512, "this CPU has no AVX-512 kernels to compare"), arguments: [1, 7, 8, 9, 16, 17, 31, 203, 2048, 5120])
    func layerNormAcrossISAs(_ width: Int) throws {
        let rows = 5
        let x = randomFloats(rows * width, seed: 18).map { $0 * 3 + 0.7 }
        var byISA: [Kernels.ISA: [Float]] = [:]
        forEachISA { isa in
            var out = [Float](repeating: .nan, count: rows * width)
            Kernels.layerNormRows(x, ldx: width, rows: rows, width: width, into: &out, ldo: width)
            byISA[isa] = out
        }
        let avx2 = try #require(byISA[.avx2]), avx512 = try #require(byISA[.avx512])
        #expect(avx2 == avx512)
    }

    // Skipped, not passed, on a CPU without AVX-512 (see `hasAVX512`): AVX2 is the only other FMA instruction set.
    @Test("expand gives the same bits under every FMA instruction set (one FMA chain per output)",
          .enabled(if: hasAVX512, "this CPU has only one FMA instruction set (no AVX-512 kernels to compare)"))
    func expandAcrossISAs() throws {
        let rows = 13, rank = 16, width = 2048 + 24
        let h = randomFloats(rows * rank, seed: 14), bt = randomFloats(rank * width, seed: 15)
        var half = [UInt16](repeating: 0, count: bt.count)
        pg_convert_from_f32(bt, 2, &half, bt.count)
        var results: [Kernels.ISA: [[Float]]] = [:]
        forEachISA { isa in
            guard isa != .portable else { return }
            var outputs: [[Float]] = []
            for (weights, dtype) in [(bt.withUnsafeBytes { Array($0) }, Int32(0)), (half.withUnsafeBytes { Array($0) }, Int32(2))] {
                var y = [Float](repeating: .nan, count: rows * width)
                weights.withUnsafeBytes { raw in
                    Kernels.loraExpand(h, count: rows, rank: rank, bTransposed: raw.baseAddress!, bDType: dtype, outWidth: width, into: &y, ldy: width)
                }
                outputs.append(y)
            }
            results[isa] = outputs
        }
        let reference = try #require(results[.avx2])
        #expect(try #require(results[.avx512]) == reference, "avx512 expand differs from avx2")
    }

    @Test("expand added into scattered rows gives the bits of expand followed by one add per row (every ISA, dtype, tail)",
          arguments: [1, 5, 13])
    func expandAddIsExpandThenAdd(_ rows: Int) throws {
        let rank = 8, width = 100, ldy = 104, outputRows = 40
        let h = randomFloats(rows * rank, seed: 41), bt = randomFloats(rank * width, seed: 42)
        var half = [UInt16](repeating: 0, count: bt.count), bf16 = half
        pg_convert_from_f32(bt, 2, &half, bt.count)
        pg_convert_from_f32(bt, 1, &bf16, bt.count)
        // Distinct rows of y, not in order, so a kernel that wrote row i instead of rows[i] (or added twice) shows.
        let scatter = (0..<rows).map { Int32((($0 * 7) + 3) % outputRows) }
        let base = randomFloats(outputRows * ldy, seed: 43).map { $0 * 100 }
        var checked = 0
        try forEachISA { isa in
            for (weights, dtype) in [(bt.withUnsafeBytes { Array($0) }, Int32(0)), (bf16.withUnsafeBytes { Array($0) }, Int32(1)),
                                     (half.withUnsafeBytes { Array($0) }, Int32(2))] {
                var expanded = [Float](repeating: .nan, count: rows * width)
                var got = base
                weights.withUnsafeBytes { raw in
                    Kernels.loraExpand(h, count: rows, rank: rank, bTransposed: raw.baseAddress!, bDType: dtype, outWidth: width,
                                       into: &expanded, ldy: width)
                    Kernels.loraExpandAdd(h, count: rows, rank: rank, bTransposed: raw.baseAddress!, bDType: dtype, outWidth: width,
                                          into: &got, ldy: ldy, rows: scatter)
                }
                var expected = base
                for i in 0..<rows {
                    for o in 0..<width { expected[Int(scatter[i]) * ldy + o] = expected[Int(scatter[i]) * ldy + o] + expanded[i * width + o] }
                }
                let differences = zip(got, expected).filter { $0.bitPattern != $1.bitPattern }.count
                #expect(differences == 0, "\(isa), dtype \(dtype): \(differences) values differ")
                checked += 1
            }
        }
        try #require(checked >= 6)
    }

    @Test("every kernel output is bitwise independent of batch size and position (per ISA)")
    func tilingInvariance() {
        let rows = 37, inWidth = 203, rank = 5, outWidth = 77, experts = 11
        let x = randomFloats(rows * inWidth, seed: 3), g = randomFloats(experts * inWidth, seed: 4)
        let aF32 = randomFloats(rank * inWidth, seed: 5), bt = randomFloats(rank * outWidth, seed: 6)
        let scale = randomFloats(rows, seed: 7)
        let tokenList = (0..<Int32(rows)).map { ($0 * 7) % Int32(rows) }
        forEachISA { isa in
            var whole = [Float](repeating: 0, count: rows * experts)
            Kernels.gemmNT(x, lda: inWidth, m: rows, g, ldb: inWidth, n: experts, k: inWidth, into: &whole, ldc: experts)
            var whole2 = [Float](repeating: 0, count: rows * rank)
            var expanded = [Float](repeating: 0, count: rows * outWidth)
            aF32.withUnsafeBytes { a in
                Kernels.loraShrink(x, ldx: inWidth, rows: tokenList, count: rows, a: a.baseAddress!, aDType: 0, rank: rank,
                                   inWidth: inWidth, rowScale: scale, loraScale: 0.25, into: &whole2)
            }
            bt.withUnsafeBytes { b in
                Kernels.loraExpand(whole2, count: rows, rank: rank, bTransposed: b.baseAddress!, bDType: 0, outWidth: outWidth, into: &expanded, ldy: outWidth)
            }
            var same = true
            for row in 0..<rows {
                var one = [Float](repeating: 0, count: experts)
                x.withUnsafeBufferPointer { xs in
                    Kernels.gemmNT(xs.baseAddress! + row * inWidth, lda: inWidth, m: 1, g, ldb: inWidth, n: experts, k: inWidth, into: &one, ldc: experts)
                }
                same = same && one == Array(whole[(row * experts)..<((row + 1) * experts)])
                var h = [Float](repeating: 0, count: rank)
                var token = tokenList[row]
                var s = scale[row]
                aF32.withUnsafeBytes { a in
                    Kernels.loraShrink(x, ldx: inWidth, rows: &token, count: 1, a: a.baseAddress!, aDType: 0, rank: rank,
                                       inWidth: inWidth, rowScale: &s, loraScale: 0.25, into: &h)
                }
                same = same && h == Array(whole2[(row * rank)..<((row + 1) * rank)])
                var y = [Float](repeating: 0, count: outWidth)
                bt.withUnsafeBytes { b in
                    Kernels.loraExpand(h, count: 1, rank: rank, bTransposed: b.baseAddress!, bDType: 0, outWidth: outWidth, into: &y, ldy: outWidth)
                }
                same = same && y == Array(expanded[(row * outWidth)..<((row + 1) * outWidth)])
            }
            #expect(same, "\(isa): a row computed alone differs from the same row in a batch")
        }
    }

    @Test("shrink and expand read BF16 and F16 weights like their F32 values", arguments: [1, 2])
    func halfPrecisionWeights(_ dtype: Int32) {
        let rows = 9, inWidth = 40, rank = 3, outWidth = 24
        let x = randomFloats(rows * inWidth, seed: 8)
        let aValues = randomFloats(rank * inWidth, seed: 9), bValues = randomFloats(rank * outWidth, seed: 10)
        // Round the weights to the half dtype first, so F32 and half paths see the same values.
        func roundTrip(_ values: [Float]) -> (half: [UInt16], exact: [Float]) {
            var half = [UInt16](repeating: 0, count: values.count)
            var exact = [Float](repeating: 0, count: values.count)
            pg_convert_from_f32(values, dtype, &half, values.count)
            pg_convert_to_f32(half, dtype, &exact, values.count)
            return (half, exact)
        }
        let a = roundTrip(aValues), b = roundTrip(bValues)
        forEachISA { isa in
            var hHalf = [Float](repeating: 0, count: rows * rank), hExact = hHalf
            Kernels.loraShrink(x, ldx: inWidth, rows: nil, count: rows, a: a.half, aDType: dtype, rank: rank, inWidth: inWidth, rowScale: nil, loraScale: 1, into: &hHalf)
            Kernels.loraShrink(x, ldx: inWidth, rows: nil, count: rows, a: a.exact, aDType: 0, rank: rank, inWidth: inWidth, rowScale: nil, loraScale: 1, into: &hExact)
            #expect(hHalf == hExact, "\(isa): shrink with dtype \(dtype)")
            var yHalf = [Float](repeating: 0, count: rows * outWidth), yExact = yHalf
            Kernels.loraExpand(hExact, count: rows, rank: rank, bTransposed: b.half, bDType: dtype, outWidth: outWidth, into: &yHalf, ldy: outWidth)
            Kernels.loraExpand(hExact, count: rows, rank: rank, bTransposed: b.exact, bDType: 0, outWidth: outWidth, into: &yExact, ldy: outWidth)
            #expect(yHalf == yExact, "\(isa): expand with dtype \(dtype)")
        }
    }

    @Test("layer norm matches a double-precision reference")
    func layerNorm() {
        let rows = 4, width = 517
        let x = randomFloats(rows * width, seed: 11).map { $0 * 3 + 0.7 }
        forEachISA { isa in
            var out = [Float](repeating: 0, count: rows * width)
            Kernels.layerNormRows(x, ldx: width, rows: rows, width: width, into: &out, ldo: width)
            var worst = 0.0
            for r in 0..<rows {
                let row = x[(r * width)..<((r + 1) * width)].map(Double.init)
                let mean = row.reduce(0, +) / Double(width)
                let variance = row.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(width)
                for (i, v) in row.enumerated() {
                    worst = max(worst, abs(Double(out[r * width + i]) - (v - mean) / (variance + 1e-5).squareRoot()))
                }
            }
            #expect(worst < 1e-5, "\(isa): worst error \(worst)")
        }
    }

    @Test("the best kernels this CPU has are chosen: AVX-512 with F, BW and VL, else AVX2 with FMA and F16C")
    func dispatch() {
        #expect(Kernels.activeISA == Kernels.bestISA)
        #if arch(x86_64)
        let flags = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        func has(_ names: [String]) -> Bool { names.allSatisfy { flags.contains(" \($0) ") || flags.contains(" \($0)\n") } }
        let avx2 = has(["avx2", "fma", "f16c"]), avx512 = avx2 && has(["avx512f", "avx512bw", "avx512vl"])
        #expect(Kernels.bestISA == (avx512 ? .avx512 : avx2 ? .avx2 : .portable))
        // Every ISA up to the best can be forced on this thread, none above it.
        for isa in Kernels.ISA.allCases { #expect(Kernels.setThreadISA(isa) == (isa.rawValue <= Kernels.bestISA.rawValue)) }
        Kernels.setThreadISA(nil)
        #endif
    }
}
