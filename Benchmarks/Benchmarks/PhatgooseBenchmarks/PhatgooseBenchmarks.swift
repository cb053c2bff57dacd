import Benchmark
import PhatgooseFormats
import PhatgooseKernels
import PhatgooseLibrary
import PhatgooseRouting
import PhatgooseRuntime
import PhatgooseSynth

/// Deterministic activations in [-0.5, 0.5).
func values(_ count: Int, salt: Int) -> [Float] {
    (0..<count).map { Float(($0 &* 7919 &+ salt &* 104_729) % 1000) / 1000 - 0.5 }
}

// Names carry no spaces: the threshold files are named after them.
let benchmarks: @Sendable () -> Void = {
    // Time in microseconds (p90 thresholds allow 35% before a regression, for a shared machine) and mallocs (none
    // allowed on a hot path: the absolute tolerance is 0).
    let timeThresholds = BenchmarkThresholds(relative: [.p90: 35.0])
    let noAllocation = BenchmarkThresholds(relative: [.p90: 0.0], absolute: [.p90: 0])
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .mallocCountTotal],
        timeUnits: .microseconds,
        warmupIterations: 3,
        maxDuration: .seconds(2),
        maxIterations: 2_000,
        thresholds: [.wallClock: timeThresholds, .mallocCountTotal: noAllocation]
    )

    // Kernels, on one thread, at W2's sizes.
    let tokens = 512, experts = 166, inWidth = 2048, outWidth = 2048, rank = 16
    let x = values(tokens * inWidth, salt: 1), gates = values(experts * inWidth, salt: 2)
    let aBF16 = SafetensorsWriter.encode(values(rank * inWidth, salt: 3), as: .bf16)
    let btBF16 = SafetensorsWriter.encode(values(rank * outWidth, salt: 4), as: .bf16)
    let rows = (0..<Int32(tokens)).map { ($0 * 37) % Int32(tokens) }
    let weights = [Float](repeating: 0.5, count: tokens)

    Benchmark("kernel_layernorm_512x2048") { benchmark in
        var out = [Float](repeating: 0, count: tokens * inWidth)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations { Kernels.layerNormRows(x, ldx: inWidth, rows: tokens, width: inWidth, into: &out, ldo: inWidth) }
        blackHole(out)
    }
    // The routing scores as the router computes them: against the gate matrix packed into panels once.
    Benchmark("kernel_scores_gemm_512x166x2048") { benchmark in
        var scores = [Float](repeating: 0, count: tokens * experts)
        let panels = ScratchBuffer(capacity: Kernels.panelFloatCount(n: experts, k: inWidth))
        Kernels.packPanels(gates, ldb: inWidth, n: experts, k: inWidth, into: panels.pointer)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            Kernels.gemmPacked(x, lda: inWidth, m: tokens, panels.pointer, n: experts, k: inWidth, into: &scores, ldc: experts)
        }
        blackHole(scores)
    }
    Benchmark("kernel_shrink_BF16_512x16x2048") { benchmark in
        var h = [Float](repeating: 0, count: tokens * rank)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            Kernels.loraShrink(x, ldx: inWidth, rows: rows, count: tokens, a: aBF16, aDType: 2, rank: rank, inWidth: inWidth,
                               rowScale: weights, loraScale: 0.0625, into: &h)
        }
        blackHole(h)
    }
    Benchmark("kernel_expand_BF16_512x16x2048") { benchmark in
        let h = values(tokens * rank, salt: 5)
        var y = [Float](repeating: 0, count: tokens * outWidth)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            Kernels.loraExpand(h, count: tokens, rank: rank, bTransposed: btBF16, bDType: 2, outWidth: outWidth, into: &y, ldy: outWidth)
        }
        blackHole(y)
    }

    // The dispatch plan for T = 512, k = 2, N = 166 (reusing its storage, as the runtime does).
    Benchmark("dispatch_plan_T512_k2_N166") { benchmark in
        var routing = RoutingResult(tokenCount: tokens, slots: 2)
        for t in 0..<tokens {
            routing.candidates[t * 2] = Int32((t * 13) % experts)
            routing.candidates[t * 2 + 1] = Int32((t * 13 + 1) % experts)
            routing.weights[t * 2] = 0.6
            routing.weights[t * 2 + 1] = 0.4
        }
        var plan = DispatchPlan()
        plan.build(from: routing, candidates: experts)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations { plan.build(from: routing, candidates: experts) }
        blackHole(plan.assignmentCount)
    }

    // One routed layer with the runtime (all CPUs: workers = CPUs - 1 plus the caller), for W1-W4.
    for workload in Workload.canonical {
        Benchmark("layer_\(workload.name)_runtime") { benchmark in
            let options = workload.synthOptions(dtype: .bf16)
            let library = try Synth.library(options)
            let runtime = try Runtime(library: library, options: RuntimeOptions(routing: RoutingOptions(topK: workload.topK), placement: .distribute))
            defer { runtime.shutdown() }
            let layer = runtime.layer(named: library.modules[0].name)!
            let input = Synth.activations(options, layer: 0, tokens: workload.tokens, sequenceLength: min(workload.tokens, 64), seed: 1)
            var output = [Float](repeating: 0, count: workload.tokens * workload.outWidth)
            try input.withUnsafeBufferPointer { x in
                try output.withUnsafeMutableBufferPointer { out in
                    try runtime.apply(layer, input: x, tokens: workload.tokens, output: out)  // sizes the scratch
                    benchmark.startMeasurement()
                    for _ in benchmark.scaledIterations { try runtime.apply(layer, input: x, tokens: workload.tokens, output: out) }
                    benchmark.stopMeasurement()
                }
            }
        }
    }

    // A model pass (M1-like) over all layers of T5-base with 36 experts, T = 64: every layer in model order, the
    // attention and feed-forward outputs feeding the next layers.
    Benchmark("model_pass_t5-base_N36_T64", configuration: .init(maxDuration: .seconds(3), maxIterations: 50)) { benchmark in
        let options = SynthOptions(shape: ModelShape.presets["t5-base"]!, experts: 36, rank: 16, weightDType: .bf16)
        let library = try Synth.library(options)
        let runtime = try Runtime(library: library, options: RuntimeOptions(routing: RoutingOptions(topK: 2), placement: .inPlace))
        defer { runtime.shutdown() }
        let pass = ModelPass(runtime: runtime, tokens: 64)
        try pass.run()
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations { try pass.run() }
        benchmark.stopMeasurement()
    }
}
