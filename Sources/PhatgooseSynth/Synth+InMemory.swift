import CPhatgooseKernels
import PhatgooseFormats
import PhatgooseLibrary

extension Synth {
    /// The library `writeLibrary` would write, built in memory (same values, same dtypes, lora_B transposed), for
    /// benchmarks and load tests that should not touch the disk.
    public static func library(_ options: SynthOptions) throws -> ExpertLibrary {
        try validate(options)
        var experts: [ExpertInfo] = []
        let configDocument = JSONValue.object([
            ("peft_type", .string("LORA")), ("r", .integer(options.rank)), ("lora_alpha", .double(options.alpha)),
            ("use_rslora", .bool(options.useRSLoRA)),
        ])
        let config = try AdapterConfig(document: configDocument, file: "synthetic")
        for e in 0..<options.experts {
            experts.append(ExpertInfo(name: options.expertName(e), path: options.expertName(e), config: config))
        }
        var modules: [RoutedModule] = []
        for (l, layer) in options.shape.layers.enumerated() {
            var pieces: [ModuleExpert] = []
            for e in 0..<options.experts where adapts(options, expert: e, layer: l) {
                let values = expertValues(options, expert: e, layer: l)
                pieces.append(ModuleExpert(
                    expert: ExpertIndex(e), rank: options.rank, alpha: options.alpha, scale: Float(config.scale(for: layer.name)),
                    a: tensor(values.a, shape: [options.rank, layer.inWidth], dtype: options.weightDType),
                    bTransposed: tensor(transposed(values.b, rows: layer.outWidth, columns: options.rank), shape: [options.rank, layer.outWidth], dtype: options.weightDType),
                    gate: tensor(values.gate, shape: [layer.inWidth], dtype: options.gateDType)))
            }
            modules.append(RoutedModule(name: layer.name, inWidth: layer.inWidth, outWidth: layer.outWidth, experts: pieces))
        }
        return ExpertLibrary(source: .directory("<synthetic>"), experts: experts, modules: modules,
                             routing: RoutingDefaults(router: .phatgoose, topK: options.topK))
    }

    static func tensor(_ values: [Float], shape: [Int], dtype: DType) -> WeightTensor {
        let buffer = HeapBuffer(byteCount: values.count * dtype.size)
        if !values.isEmpty { pg_convert_from_f32(values, dtype.kernelCode!, buffer.pointer, values.count) }
        return WeightTensor(dtype: dtype, shape: shape, owner: buffer, pointer: UnsafeRawPointer(buffer.pointer))
    }

    static func transposed(_ values: [Float], rows: Int, columns: Int) -> [Float] {
        var result = [Float](repeating: 0, count: values.count)
        for r in 0..<rows { for c in 0..<columns { result[c * rows + r] = values[r * columns + c] } }
        return result
    }
}
