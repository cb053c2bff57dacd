import PhatgooseFormats
import PhatgooseLibrary

/// `phatgoose apply` as a function: every tensor of an input file, keyed by module name, [T, in], routed and applied
/// at its module. Outputs per key: `<module>` the mixture delta F32 [T, out] (without W x), `<module>.experts` I32
/// [T, slots] (expert indices, -1 for padding), `<module>.weights` F32 [T, slots].
public enum ApplyFile {
    /// Applies `library` to every tensor of `input`, returning the output file's contents.
    public static func apply(_ library: ExpertLibrary, input: SafetensorsFile, options: RoutingOptions) throws -> SafetensorsWriter {
        let executor = LayerExecutor()
        var routers: [Int: LayerRouter] = [:]
        return try apply(library, input: input, slots: { m in
            if routers[m] == nil { routers[m] = try LayerRouter(module: library.modules[m], options: options) }
            return routers[m]!.slots
        }, run: { m, x, tokens, out, experts, weights in
            let module = library.modules[m]
            let router = routers[m]!
            executor.apply(module, router: router, x: x, ldx: module.inWidth, tokens: tokens, out: out, ldo: module.outWidth)
            for i in 0..<(tokens * router.slots) {
                let c = executor.routing.candidates[i]
                experts[i] = c < 0 ? -1 : module.experts[Int(c)].expert.rawValue
                weights[i] = executor.routing.weights[i]
            }
        })
    }

    /// The same with another executor: `slots(m)` gives the output slots per token at module index `m`, and
    /// `run(m, x, tokens, out, experts, weights)` routes and applies module `m` to `tokens` rows of `x` (F32, after
    /// the input's checks), adding the delta into the zeroed `out` [tokens, out] and writing each token's expert
    /// indices (-1 for padding) and weights [tokens, slots]. It is not called for a module's empty batch.
    public static func apply(_ library: ExpertLibrary, input: SafetensorsFile, slots: (Int) throws -> Int,
                             run: (Int, UnsafePointer<Float>, Int, UnsafeMutablePointer<Float>, UnsafeMutablePointer<Int32>,
                                   UnsafeMutablePointer<Float>) throws -> Void) throws -> SafetensorsWriter {
        var writer = SafetensorsWriter()
        let inputNames = Set(input.tensors.map(\.name))
        // Outputs follow the input's order of keys in the file.
        for info in input.tensors {
            func failure(_ message: String) -> FormatError {
                FormatError(.values, file: input.path, subject: "tensor '\(info.name)'", message)
            }
            guard let m = library.moduleIndex(of: info.name) else {
                throw failure("expected the name of a module of the library, found no module of that name")
            }
            let module = library.modules[m]
            for suffix in [".experts", ".weights"] where inputNames.contains(info.name + suffix) {
                throw failure("expected output keys that do not collide with input keys, found an input named '\(info.name + suffix)'")
            }
            guard info.dtype.isComputeFloat else { throw failure("expected dtype F32, F16 or BF16, found \(info.dtype.rawValue)") }
            guard info.shape.count == 2, info.shape[1] == module.inWidth else {
                throw failure("expected shape [T, \(module.inWidth)] (module \(module.name) takes \(module.inWidth) inputs), found \(info.shapeDescription)")
            }
            let view = input.view(info)
            let bad = view.nonFiniteCount()
            guard bad == 0 else { throw failure("expected finite activations, found \(bad) NaN or infinite values") }
            let tokens = info.shape[0]
            let x = try view.floats()
            let slotCount = try slots(m)
            var delta = [Float](repeating: 0, count: tokens * module.outWidth)
            var experts = [Int32](repeating: -1, count: tokens * slotCount)
            var weights = [Float](repeating: 0, count: tokens * slotCount)
            if tokens > 0 {
                try x.withUnsafeBufferPointer { xs in
                    try delta.withUnsafeMutableBufferPointer { out in
                        try experts.withUnsafeMutableBufferPointer { e in
                            try weights.withUnsafeMutableBufferPointer { w in
                                try run(m, xs.baseAddress!, tokens, out.baseAddress!, e.baseAddress!, w.baseAddress!)
                            }
                        }
                    }
                }
            }
            writer.add(info.name, floats: delta, shape: [tokens, module.outWidth])
            writer.add(info.name + ".experts", int32s: experts, shape: [tokens, slotCount])
            writer.add(info.name + ".weights", floats: weights, shape: [tokens, slotCount])
        }
        return writer
    }
}
