import PhatgooseFormats
import PhatgooseLibrary

/// `phatgoose apply` as a function: every tensor of an input file, keyed by module name, [T, in], routed and applied
/// at its module. Outputs per key: `<module>` the mixture delta F32 [T, out] (without W x), `<module>.experts` I32
/// [T, slots] (expert indices, -1 for padding), `<module>.weights` F32 [T, slots].
public enum ApplyFile {
    /// Applies `library` to every tensor of `input`, returning the output file's contents.
    public static func apply(_ library: ExpertLibrary, input: SafetensorsFile, options: RoutingOptions) throws -> SafetensorsWriter {
        var writer = SafetensorsWriter()
        let inputNames = Set(input.tensors.map(\.name))
        let executor = LayerExecutor()
        // Outputs follow the input's order of keys in the file.
        for info in input.tensors {
            func failure(_ message: String) -> FormatError {
                FormatError(.values, file: input.path, subject: "tensor '\(info.name)'", message)
            }
            guard let module = library.module(named: info.name) else {
                throw failure("expected the name of a module of the library, found no module of that name")
            }
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
            let router = try LayerRouter(module: module, options: options)
            var delta = [Float](repeating: 0, count: tokens * module.outWidth)
            x.withUnsafeBufferPointer { xs in
                delta.withUnsafeMutableBufferPointer { out in
                    guard tokens > 0 else { return }
                    executor.apply(module, router: router, x: xs.baseAddress!, ldx: module.inWidth, tokens: tokens,
                                   out: out.baseAddress!, ldo: module.outWidth)
                }
            }
            let slots = router.slots
            var experts = [Int32](repeating: -1, count: tokens * slots)
            var weights = [Float](repeating: 0, count: tokens * slots)
            if tokens > 0 {
                for i in 0..<(tokens * slots) {
                    let c = executor.routing.candidates[i]
                    experts[i] = c < 0 ? -1 : module.experts[Int(c)].expert.rawValue
                    weights[i] = executor.routing.weights[i]
                }
            }
            writer.add(info.name, floats: delta, shape: [tokens, module.outWidth])
            writer.add(info.name + ".experts", int32s: experts, shape: [tokens, slots])
            writer.add(info.name + ".weights", floats: weights, shape: [tokens, slots])
        }
        return writer
    }
}
