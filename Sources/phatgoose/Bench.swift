import ArgumentParser
import Dispatch
import Foundation
import PhatgooseFormats
import PhatgooseKernels
import PhatgooseLibrary
import PhatgooseProfiling
import PhatgooseRouting
import PhatgooseRuntime
import PhatgooseSynth

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure the machine's roofline, then one routed layer with the runtime, a naive per-token loop and a dense baseline.",
        discussion: """
            Each result is the median and p90 time per call over repeated calls on the same batch, its GFLOP/s, and \
            its fraction of the roofline: max(flops / peak, bytes / bandwidth) / time, with peak and bandwidth \
            measured in the same run.
            """
    )

    @Option(help: "Canonical workload: \(Workload.canonical.map(\.name).joined(separator: ", ")), or M1 (a T5-XL model pass) (default: W1, W2 and W3).")
    var workload: [String] = []

    @Option(parsing: .unconditional, help: "Custom workload: number of experts.") var experts: Int?
    @Option(name: .customLong("in"), parsing: .unconditional, help: "Custom workload: input width.") var inWidth: Int?
    @Option(name: .customLong("out"), parsing: .unconditional, help: "Custom workload: output width.") var outWidth: Int?
    @Option(parsing: .unconditional, help: "Custom workload: LoRA rank.") var rank: Int = 16
    @Option(parsing: .unconditional, help: "Custom workload: tokens per call.") var tokens: Int?
    @Option(parsing: .unconditional, help: "Custom workload: experts per token.") var topK: Int = 2

    @Option(parsing: .unconditional, help: "Threads for the machine probe and the runtime.")
    var threads: Int = ProcessInfo.processInfo.activeProcessorCount

    @Option(help: "Implementations to run (comma-separated): runtime (pinned workers, at 1 thread and at --threads), dispatch (the runtime on Dispatch, at --threads), naive, dense.")
    var impl: String = "runtime,dispatch,naive,dense"

    @Flag(help: "Also report, for the runtime, the time per call spent in each phase (routing, plan, items, combine), from the observer.")
    var breakdown = false

    @Flag(help: "Instead of layers, measure the fan-out and join overhead of an empty parallel phase, pinned pool vs Dispatch.")
    var overhead = false

    @Option(help: "Weight dtype: f32, f16 or bf16.")
    var dtype: String = "bf16"

    @Option(parsing: .unconditional, help: "M1: experts in the T5-XL library (36 for P3, 166 for FLAN).")
    var modelExperts: Int = 36

    @Option(help: "M1: tokens per pass (comma-separated).")
    var modelTokens: String = "64,512"

    @Option(parsing: .unconditional, help: "Seconds of measurement per (workload, implementation).")
    var seconds: Double = 1

    @Option(help: "Instead of layers, time opening this library (directory or packed) with the page cache warm.")
    var open: String?

    @Flag(help: "Instead of layers, measure each kernel alone on one thread, with every instruction set this CPU has.")
    var kernels = false

    @Option(help: "Kernel instruction sets to run the layers with (comma-separated, side by side): portable, avx2, avx512 (default: the best this CPU has). The machine probe always uses the best.")
    var isa: String?

    @Option(help: "Output format: text or json.")
    var format: OutputFormat = .text

    @OptionGroup var distributed: DistributedFlags

    @Option(name: .customLong("mpi-tokens"), help: "With --mpi: tokens per call (comma-separated).")
    var mpiTokensList: String = "1,8,64,512"

    var mpiTokens: [Int] { mpiTokensList.split(separator: ",").compactMap { Int($0) } }

    /// The instruction sets named by --isa, in order; the best one when it is absent.
    var layerISAs: [Kernels.ISA] {
        guard let isa else { return [Kernels.bestISA] }
        return isa.split(separator: ",").compactMap { name in Kernels.ISA.allCases.first { $0.description == name } }
    }

    func validate() throws {
        for name in workload where name != "M1" && !Workload.canonical.contains(where: { $0.name == name }) {
            throw ValidationError("--workload: expected one of \(Workload.canonical.map(\.name).joined(separator: ", ")), found \(name)")
        }
        let custom = [experts, inWidth, outWidth, tokens].compactMap { $0 }
        if !custom.isEmpty && custom.count != 4 { throw ValidationError("a custom workload needs --experts, --in, --out and --tokens") }
        for (flag, value) in [("--experts", experts), ("--in", inWidth), ("--out", outWidth), ("--tokens", tokens), ("--rank", rank), ("--top-k", topK)] {
            if let value, value < 1 { throw ValidationError("\(flag): expected an integer >= 1, found \(value)") }
        }
        guard threads >= 1 else { throw ValidationError("--threads: expected at least 1, found \(threads)") }
        guard DType(userSpelling: dtype)?.isComputeFloat == true else { throw ValidationError("--dtype: expected f32, f16 or bf16, found \(dtype)") }
        for name in impl.split(separator: ",") where !["runtime", "dispatch", "naive", "dense"].contains(String(name)) {
            throw ValidationError("--impl: expected runtime, dispatch, naive or dense, found \(name)")
        }
        guard seconds > 0 else { throw ValidationError("--seconds: expected a positive number") }
        let mpiTokenItems = mpiTokensList.split(separator: ",", omittingEmptySubsequences: false)
        guard !mpiTokenItems.isEmpty, mpiTokenItems.allSatisfy({ Int($0).map { $0 >= 1 } ?? false }) else {
            throw ValidationError("--mpi-tokens: expected positive integers separated by commas, found '\(mpiTokensList)'")
        }
        for name in isa?.split(separator: ",", omittingEmptySubsequences: false) ?? [] {
            guard let known = Kernels.ISA.allCases.first(where: { $0.description == name }) else {
                throw ValidationError("--isa: expected portable, avx2 or avx512, found '\(name)'")
            }
            guard known.rawValue <= Kernels.bestISA.rawValue else {
                throw ValidationError("--isa: this CPU cannot run \(known) (its best is \(Kernels.bestISA))")
            }
        }
    }

    func run() throws {
        if let open { return try timeOpen(open) }
        if kernels { return timeKernels() }
        if overhead { return timeOverhead() }
        if distributed.mpi { return try timeDistributed() }
        var workloads = Workload.canonical.filter { workload.contains($0.name) }
        if let experts, let inWidth, let outWidth, let tokens {
            workloads.append(Workload(name: "custom", experts: experts, inWidth: inWidth, outWidth: outWidth, tokens: tokens, topK: topK, rank: rank))
        }
        if workloads.isEmpty && !workload.contains("M1") { workloads = Workload.canonical.filter { ["W1", "W2", "W3"].contains($0.name) } }
        let machine = MachineProbe.measure(threads: threads)
        let weightDType = DType(userSpelling: dtype)!
        var results: [JSONValue] = []
        if format == .text {
            print(String(format: "machine: %d threads, peak %.1f GFLOP/s (SGEMM; FMA issue limit %.1f), bandwidth %.1f GB/s (copy)", threads,
                         machine.peakGFLOPS, machine.fmaPeakGFLOPS, machine.bandwidthGBps))
            print("workload  impl      threads  median us     p90 us   GFLOP/s  roofline")
        }
        for workload in workloads {
            let options = workload.synthOptions(dtype: weightDType)
            let library = try Synth.library(options)
            let module = library.modules[0]
            let x = Synth.activations(options, layer: 0, tokens: workload.tokens, sequenceLength: min(workload.tokens, 64), seed: 1)
            let routing = RoutingOptions(topK: workload.topK)
            let router = try LayerRouter(module: module, options: routing)
            var out = [Float](repeating: 0, count: workload.tokens * workload.outWidth)
            // Distinct experts the batch chooses, for the bytes a call must move.
            let probe = LayerExecutor()
            probe.apply(module, router: router, x: x, ldx: workload.inWidth, tokens: workload.tokens, out: &out, ldo: workload.outWidth)
            let active = Set(probe.routing.candidates.filter { $0 >= 0 }).count
            let bytes = workload.bytes(activeExperts: active, weightBytes: weightDType.size)
            let rooflineSeconds = max(workload.flops / (machine.peakGFLOPS * 1e9), bytes / (machine.bandwidthGBps * 1e9))
            var runs: [(name: String, threads: Int, call: () throws -> Void)] = []
            for name in impl.split(separator: ",").map(String.init) {
                switch name {
                case "runtime", "dispatch":
                    let counts = name == "dispatch" ? [threads] : (threads > 1 ? [1, threads] : [1])
                    for count in counts {
                        let runtime = try Runtime(library: library, options: RuntimeOptions(
                            routing: routing, workers: count - 1, executor: name == "dispatch" ? .dispatch : .pinned, placement: .distribute))
                        let layer = runtime.layer(named: module.name)!
                        runs.append((name, count, {
                            try x.withUnsafeBufferPointer { input in
                                try out.withUnsafeMutableBufferPointer { output in try runtime.apply(layer, input: input, tokens: workload.tokens, output: output) }
                            }
                        }))
                    }
                case "naive":
                    let naive = NaiveExecutor()
                    runs.append((name, 1, { naive.apply(module, router: router, x: x, ldx: workload.inWidth, tokens: workload.tokens, out: &out, ldo: workload.outWidth) }))
                default:
                    let dense = DenseExecutor()
                    runs.append((name, 1, { dense.apply(module, router: router, x: x, ldx: workload.inWidth, tokens: workload.tokens, out: &out, ldo: workload.outWidth) }))
                }
            }
            defer { Kernels.setISA(Kernels.bestISA) }
            for kernelISA in layerISAs {
            // Between runs no kernel is running, so switching the process-wide ISA is safe.
            Kernels.setISA(kernelISA)
            var single: Double? = nil
            for run in runs {
                let times = try Self.time(run.call, seconds: seconds)
                let median = times[times.count / 2], p90 = times[min(times.count - 1, times.count * 9 / 10)]
                if run.name == "runtime" && run.threads == 1 { single = median }
                let speedup = run.name == "runtime" && run.threads > 1 ? single.map { $0 / median } : nil
                results.append(.object([
                    ("workload", .string(workload.name)), ("impl", .string(run.name)), ("threads", .integer(run.threads)),
                    ("us_per_call_median", .double(median * 1e6)), ("us_per_call_p90", .double(p90 * 1e6)),
                    ("gflops", .double(workload.flops / median / 1e9)), ("roofline_fraction", .double(rooflineSeconds / median)),
                    ("calls", .integer(times.count)), ("active_experts", .integer(active)),
                    ("speedup_vs_1_thread", speedup.map { .double($0) } ?? .null), ("isa", .string(kernelISA.description)),
                ]))
                if breakdown && run.name == "runtime" {
                    let phases = try Self.phaseBreakdown(library: library, module: module.name, routing: routing, threads: run.threads, x: x, tokens: workload.tokens)
                    if format == .text { print("          phases: " + phases.map { $0.0 + String(format: " %.0f us", $0.1) }.joined(separator: ", ")) }
                }
                if format == .text {
                    let name8 = run.name.padding(toLength: 8, withPad: " ", startingAt: 0)
                    let workload8 = workload.name.padding(toLength: 8, withPad: " ", startingAt: 0)
                    print(workload8 + "  " + name8 + String(format: "  %7d  %9.1f  %9.1f  %8.2f  %7.1f%%", run.threads, median * 1e6, p90 * 1e6,
                                                            workload.flops / median / 1e9, 100 * rooflineSeconds / median)
                          + (layerISAs.count > 1 ? "  " + kernelISA.description : "")
                          + (speedup.map { String(format: "  %.2fx vs 1 thread", $0) } ?? ""))
                }
            }
            }
        }
        if workload.contains("M1") {
            results += try modelPasses(weightDType: weightDType)
        }
        if format == .json {
            print(JSONValue.object([
                ("machine", .object([("cpus", .integer(ProcessInfo.processInfo.activeProcessorCount)), ("threads", .integer(threads)),
                                     ("peak_gflops", .double(machine.peakGFLOPS)), ("bandwidth_gbs", .double(machine.bandwidthGBps)),
                                     ("fma_peak_gflops", .double(machine.fmaPeakGFLOPS)),
                                     ("isa", .string(String(describing: PhatgooseKernels.Kernels.activeISA)))])),
                ("results", .array(results)),
            ]).serialized())
        }
    }

    /// Each kernel at W1/W2-like sizes on the calling thread, per instruction set, against one core's share of the
    /// measured all-core peak.
    func timeKernels() {
        let machine = MachineProbe.measure(threads: threads)
        let corePeak = machine.peakGFLOPS / Double(threads)
        let tokens = 512, experts = 166, inWidth = 2048, outWidth = 2048, rank = 16
        let x = (0..<(tokens * inWidth)).map { Float(($0 * 7919) % 1000) / 1000 - 0.5 }
        let gates = (0..<(experts * inWidth)).map { Float(($0 * 104_729) % 1000) / 1000 - 0.5 }
        let a = (0..<(rank * inWidth)).map { Float(($0 * 31) % 97) / 97 - 0.5 }
        let bt = (0..<(rank * outWidth)).map { Float(($0 * 17) % 89) / 89 - 0.5 }
        let aBF16 = SafetensorsWriter.encode(a, as: .bf16), btBF16 = SafetensorsWriter.encode(bt, as: .bf16)
        var scores = [Float](repeating: 0, count: tokens * experts)
        var normalized = [Float](repeating: 0, count: tokens * inWidth)
        var h = [Float](repeating: 0, count: tokens * rank)
        var y = [Float](repeating: 0, count: tokens * outWidth)
        let rows = (0..<Int32(tokens)).map { ($0 * 37) % Int32(tokens) }
        let weights = [Float](repeating: 0.5, count: tokens)
        let panels = ScratchBuffer(capacity: Kernels.panelFloatCount(n: experts, k: inWidth))
        gates.withUnsafeBufferPointer { Kernels.packPanels($0.baseAddress!, ldb: inWidth, n: experts, k: inWidth, into: panels.pointer) }
        let alignedX = ScratchBuffer(capacity: tokens * inWidth)
        x.withUnsafeBufferPointer { alignedX.pointer.update(from: $0.baseAddress!, count: $0.count) }
        typealias Case = (name: String, flops: Double, run: () -> Void)
        let cases: [Case] = [
            ("layernorm 512x2048", 5.0 * Double(tokens * inWidth), { Kernels.layerNormRows(x, ldx: inWidth, rows: tokens, width: inWidth, into: &normalized, ldo: inWidth) }),
            ("scores gemm 512x166x2048", 2.0 * Double(tokens * experts * inWidth), { Kernels.gemmNT(x, lda: inWidth, m: tokens, gates, ldb: inWidth, n: experts, k: inWidth, into: &scores, ldc: experts) }),
            ("scores gemv 1x166x2048", 2.0 * Double(experts * inWidth), { Kernels.gemmNT(x, lda: inWidth, m: 1, gates, ldb: inWidth, n: experts, k: inWidth, into: &scores, ldc: experts) }),
            // What the router runs: 64-byte aligned normalised rows against the packed gate panels.
            ("scores packed 512x166x2048", 2.0 * Double(tokens * experts * inWidth), {
                Kernels.gemmPacked(alignedX.pointer, lda: inWidth, m: tokens, panels.pointer, n: experts, k: inWidth, into: &scores, ldc: experts) }),
            ("scores packed 8x166x2048", 2.0 * Double(8 * experts * inWidth), {
                Kernels.gemmPacked(alignedX.pointer, lda: inWidth, m: 8, panels.pointer, n: experts, k: inWidth, into: &scores, ldc: experts) }),
            ("shrink F32 512x16x2048", 2.0 * Double(tokens * rank * inWidth), { Kernels.loraShrink(x, ldx: inWidth, rows: rows, count: tokens, a: a, aDType: 0, rank: rank, inWidth: inWidth, rowScale: weights, loraScale: 0.0625, into: &h) }),
            ("shrink BF16 512x16x2048", 2.0 * Double(tokens * rank * inWidth), { Kernels.loraShrink(x, ldx: inWidth, rows: rows, count: tokens, a: aBF16, aDType: 2, rank: rank, inWidth: inWidth, rowScale: weights, loraScale: 0.0625, into: &h) }),
            ("expand F32 512x16x2048", 2.0 * Double(tokens * rank * outWidth), { Kernels.loraExpand(h, count: tokens, rank: rank, bTransposed: bt, bDType: 0, outWidth: outWidth, into: &y, ldy: outWidth) }),
            ("expand BF16 512x16x2048", 2.0 * Double(tokens * rank * outWidth), { Kernels.loraExpand(h, count: tokens, rank: rank, bTransposed: btBF16, bDType: 2, outWidth: outWidth, into: &y, ldy: outWidth) }),
        ]
        var results: [JSONValue] = []
        if format == .text {
            print(String(format: "one core's share of the measured peak: %.1f GFLOP/s", corePeak))
            print("kernel                        isa        median us   GFLOP/s  of core peak")
        }
        defer { Kernels.setThreadISA(nil) }
        for isa in Kernels.ISA.allCases where Kernels.setThreadISA(isa) {
            for kernel in cases {
                let times = Self.time(kernel.run, seconds: seconds / Double(cases.count))
                let median = times[times.count / 2]
                let gflops = kernel.flops / median / 1e9
                results.append(.object([("kernel", .string(kernel.name)), ("isa", .string(isa.description)),
                                        ("us_median", .double(median * 1e6)), ("gflops", .double(gflops)),
                                        ("core_peak_fraction", .double(gflops / corePeak))]))
                if format == .text {
                    print(kernel.name.padding(toLength: 30, withPad: " ", startingAt: 0) + isa.description.padding(toLength: 9, withPad: " ", startingAt: 0)
                          + String(format: "  %9.1f  %8.2f  %10.1f%%", median * 1e6, gflops, 100 * gflops / corePeak))
                }
            }
        }
        if format == .json {
            print(JSONValue.object([("machine", .object([("threads", .integer(threads)), ("peak_gflops", .double(machine.peakGFLOPS)),
                                                         ("core_peak_gflops", .double(corePeak))])),
                                    ("kernels", .array(results))]).serialized())
        }
    }

    /// Mean wall time per call of each phase kind over 20 calls, summed over participants (so parallel phases count
    /// each participant's time).
    static func phaseBreakdown(library: ExpertLibrary, module: String, routing: RoutingOptions, threads: Int, x: [Float], tokens: Int) throws -> [(String, Double)] {
        let accounting = PhaseAccounting(participants: threads, layers: library.modules.count)
        let runtime = try Runtime(library: library, options: RuntimeOptions(routing: routing, workers: threads - 1, observer: accounting))
        defer { runtime.shutdown() }
        let layer = runtime.layer(named: module)!
        for _ in 0..<3 { _ = try runtime.apply(layer, input: x, tokens: tokens) }
        let before = accounting.snapshot()
        for _ in 0..<20 { _ = try runtime.apply(layer, input: x, tokens: tokens) }
        let totals = accounting.snapshot().subtracting(before)
        return [RuntimeEvent.Kind.call, .routing, .plan, .item, .steal, .combine].map { kind in
            let nanoseconds = totals.participants.reduce(UInt64(0)) { $0 + $1[kind] }
            return (kind.rawValue, Double(nanoseconds) / 20 / 1000)
        }
    }

    /// M1: every routed layer of T5-XL (432) in model order, per pass, for each token count; tokens per second.
    func modelPasses(weightDType: DType) throws -> [JSONValue] {
        let options = SynthOptions(shape: ModelShape.presets["t5-xl"]!, experts: modelExperts, rank: 16, weightDType: weightDType)
        let built = DispatchTime.now().uptimeNanoseconds
        let library = try Synth.library(options)
        if format == .text {
            print("M1: built T5-XL x \(modelExperts) experts (" + LibraryReport.formatBytes(library.weightByteCount)
                  + String(format: ") in memory in %.1f s", Double(DispatchTime.now().uptimeNanoseconds - built) / 1e9))
        }
        var rows: [JSONValue] = []
        for tokenCount in modelTokens.split(separator: ",").compactMap({ Int($0) }) {
            let runtime = try Runtime(library: library, options: RuntimeOptions(routing: RoutingOptions(topK: 2), workers: threads - 1, placement: .inPlace))
            defer { runtime.shutdown() }
            let pass = ModelPass(runtime: runtime, tokens: tokenCount)
            let times = try Self.time({ try pass.run() }, seconds: seconds * 3)
            let median = times[times.count / 2], p90 = times[min(times.count - 1, times.count * 9 / 10)]
            rows.append(.object([("workload", .string("M1")), ("impl", .string("runtime")), ("threads", .integer(threads)),
                                 ("tokens", .integer(tokenCount)), ("layers", .integer(pass.layerCount)), ("experts", .integer(modelExperts)),
                                 ("ms_per_pass_median", .double(median * 1e3)), ("ms_per_pass_p90", .double(p90 * 1e3)),
                                 ("tokens_per_second", .double(Double(tokenCount) / median)), ("passes", .integer(times.count))]))
            if format == .text {
                print(String(format: "M1 T=%d: %d layers, median %.1f ms per pass (p90 %.1f), %.0f tokens/s, %d threads", tokenCount, pass.layerCount,
                             median * 1e3, p90 * 1e3, Double(tokenCount) / median, threads))
            }
        }
        return rows
    }

    /// Fan-out and join of an empty phase on every participant, pinned pool against Dispatch.
    func timeOverhead() {
        let topology = Topology.detect()
        var rows: [JSONValue] = []
        for kind in ExecutorKind.allCases {
            let executor: any ParallelExecutor = kind == .pinned
                ? PinnedWorkerPool(topology: topology, workers: threads - 1) : DispatchParallelExecutor(topology: topology, workers: threads - 1)
            defer { executor.shutdown() }
            let job = EmptyJob()
            let times = Self.time({ executor.run(job) }, seconds: seconds)
            let median = times[times.count / 2], p90 = times[min(times.count - 1, times.count * 9 / 10)]
            rows.append(.object([("executor", .string(kind.rawValue)), ("participants", .integer(threads)),
                                 ("us_median", .double(median * 1e6)), ("us_p90", .double(p90 * 1e6)), ("runs", .integer(times.count))]))
            if format == .text {
                print(kind.rawValue + String(format: " executor, %d participants: fan-out + join median %.2f us, p90 %.2f us over %d runs", threads, median * 1e6, p90 * 1e6, times.count))
            }
        }
        if format == .json { print(JSONValue.object([("overhead", .array(rows))]).serialized()) }
    }

    /// Median and p90 of opening `path`, after one untimed open that warms the page cache.
    func timeOpen(_ path: String) throws {
        var library: ExpertLibrary? = try ExpertLibrary.load(path: path)
        let bytes = library!.weightByteCount, modules = library!.modules.count, experts = library!.experts.count
        library = nil
        var times: [Double] = []
        let begin = DispatchTime.now().uptimeNanoseconds
        while times.count < 3 || (DispatchTime.now().uptimeNanoseconds - begin < UInt64(seconds * 1e9) && times.count < 1000) {
            let start = DispatchTime.now().uptimeNanoseconds
            library = try ExpertLibrary.load(path: path)
            times.append(Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9)
            library = nil
        }
        times.sort()
        let median = times[times.count / 2], p90 = times[min(times.count - 1, times.count * 9 / 10)]
        switch format {
        case .json:
            print(JSONValue.object([("open", .string(path)), ("experts", .integer(experts)), ("modules", .integer(modules)),
                                    ("bytes", .integer(bytes)), ("opens", .integer(times.count)),
                                    ("ms_median", .double(median * 1e3)), ("ms_p90", .double(p90 * 1e3))]).serialized())
        case .text:
            print(String(format: "open: %d experts x %d modules, ", experts, modules) + LibraryReport.formatBytes(bytes)
                  + String(format: ": median %.1f ms, p90 %.1f ms over %d opens (page cache warm)", median * 1e3, p90 * 1e3, times.count))
        }
    }

    /// Per-call times in seconds, sorted: two warm-up calls, then calls until `seconds` pass (at least 5).
    static func time(_ call: () throws -> Void, seconds: Double) rethrows -> [Double] {
        try call()
        try call()
        var times: [Double] = []
        let budget = UInt64(seconds * 1e9)
        let begin = DispatchTime.now().uptimeNanoseconds
        while times.count < 5 || (DispatchTime.now().uptimeNanoseconds - begin < budget && times.count < 100_000) {
            let start = DispatchTime.now().uptimeNanoseconds
            try call()
            times.append(Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9)
        }
        return times.sorted()
    }
}

/// A phase with no work, to time fan-out and join alone.
final class EmptyJob: ParallelJob {
    func run(participant: Int) {}
}
