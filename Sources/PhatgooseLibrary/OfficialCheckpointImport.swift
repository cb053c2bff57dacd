import PhatgooseFormats

/// Converts an official PHATGOOSE release checkpoint (r-three/phatgoose `best.pt`, a `torch.save` zip of a T5 state
/// dict with the experts as addons) into a library in the user layout (PEFT adapters, gates, `library.json`).
///
/// Keys read, per module `<m>` and expert index `i` (every other key is ignored):
/// 1. `<m>._addons.expert_lora.layer1__<i>` [in, r] becomes `base_model.model.<m>.lora_A.weight` = its transpose [r, in];
/// 2. `<m>._addons.expert_lora.layer2__<i>` [r, out] becomes `base_model.model.<m>.lora_B.weight` = its transpose [out, r];
/// 3. `<m>._addons.router.expert_embeddings__<i>` [in] becomes the gate `<m>`.
///
/// Each expert's `adapter_config.json` has `r` = its rank and `lora_alpha` 1, so scale = 1/r: the official
/// `FFNExperts` divides the LoRA output by `d_bottleneck` (16), the rank. Tensors keep their dtype (BF16 stays BF16).
/// Refused, naming the key: a (module, index) that has some of the three tensors but not all; shapes that disagree
/// with each other or with other experts at the module; dtypes other than F32, F16 and BF16; indices that are not
/// 0..<N without gaps; a checkpoint without experts.
///
/// The checkpoint is read through a mapping and written one expert at a time, so memory holds at most one expert's
/// weights beyond what the page cache keeps. The library is built in a staging directory, each expert loaded and
/// validated as the library loader reads it once written, and renamed into place at the end.
public enum OfficialCheckpointImport {
    /// What an import wrote.
    public struct Summary: Sendable {
        /// The experts' names in index order.
        public var experts: [String]
        /// Number of distinct modules adapted.
        public var modules: Int
        /// Bytes of LoRA weights written.
        public var weightBytes: Int
        /// The dtypes of the LoRA weights, sorted.
        public var dtypes: [String]
        /// State-dict keys that were not expert tensors (ignored).
        public var ignoredKeys: Int
    }

    private enum Part: Int { case layer1 = 0, layer2 = 1, embedding = 2 }

    private struct Slot {
        var tensors: [TorchTensor?] = [nil, nil, nil]
        var keys: [String?] = [nil, nil, nil]
    }

    /// Parses `<m>._addons.expert_lora.layer1__<i>` and the two other expert keys.
    private static func parse(_ key: String) -> (module: String, part: Part, index: Int)? {
        let forms: [(String, Part)] = [("._addons.expert_lora.layer1__", .layer1), ("._addons.expert_lora.layer2__", .layer2),
                                       ("._addons.router.expert_embeddings__", .embedding)]
        for (marker, part) in forms {
            guard let range = key.range(of: marker, options: .backwards) else { continue }
            let digits = key[range.upperBound...]
            guard !digits.isEmpty, digits.count <= 7, digits.allSatisfy({ $0.isASCII && $0.isNumber }), let index = Int(digits) else { return nil }
            let module = String(key[..<range.lowerBound])
            guard !module.isEmpty else { return nil }
            return (module, part, index)
        }
        return nil
    }

    private static func key(_ module: String, _ part: Part, _ index: Int) -> String {
        switch part {
        case .layer1: return "\(module)._addons.expert_lora.layer1__\(index)"
        case .layer2: return "\(module)._addons.expert_lora.layer2__\(index)"
        case .embedding: return "\(module)._addons.router.expert_embeddings__\(index)"
        }
    }

    /// Default expert names: `expert0`, `expert1`, ... zero-padded so that byte order is index order.
    public static func defaultNames(count: Int) -> [String] {
        let digits = String(max(count - 1, 0)).count
        return (0..<count).map { i in
            let number = String(i)
            return "expert" + String(repeating: "0", count: digits - number.count) + number
        }
    }

    /// Imports `checkpoint` into a new library directory `directory` (which must not exist, or be empty).
    /// `names`, when given, names the experts in index order and must have one name per expert.
    public static func run(checkpoint path: String, to directory: String, names: [String]? = nil, topK: Int = 2) throws -> Summary {
        let checkpoint = try TorchCheckpoint(path: path)
        func failure(_ key: String?, _ message: String) -> FormatError {
            FormatError(.checkpoint, file: path, subject: key.map { "key '\($0)'" }, message)
        }

        // Gather (module, index) slots in the order modules first appear.
        var slots: [String: [Int: Slot]] = [:]
        var moduleOrder: [String] = []
        var ignored = 0
        for (name, tensor) in checkpoint.tensors {
            guard let (module, part, index) = parse(name) else { ignored += 1; continue }
            if slots[module] == nil { slots[module] = [:]; moduleOrder.append(module) }
            var slot = slots[module]![index] ?? Slot()
            slot.tensors[part.rawValue] = tensor
            slot.keys[part.rawValue] = name
            slots[module]![index] = slot
        }
        ignored += checkpoint.otherKeys.count
        let indices = Set(slots.values.flatMap { $0.keys })
        guard !indices.isEmpty else {
            throw failure(nil, "expected expert tensors '<module>._addons.expert_lora.layer1__<i>', 'layer2__<i>' and '<module>._addons.router.expert_embeddings__<i>', found none among \(checkpoint.tensors.count) tensors")
        }
        let count = indices.count
        if let gap = (0..<count).first(where: { !indices.contains($0) }) {
            let beyond = indices.filter { $0 >= count }.min()!
            let module = moduleOrder.first { slots[$0]![beyond] != nil }!
            let slot = slots[module]![beyond]!
            throw failure(slot.keys.compactMap { $0 }.first, "expected consecutive expert indices from 0, found index \(beyond) but no index \(gap)")
        }
        if let names {
            guard names.count == count else {
                throw LibraryError(.library, file: path, subject: "--names", "expected \(count) names (one per expert in the checkpoint), found \(names.count)")
            }
            var seen = Set<String>()
            for name in names {
                guard !name.isEmpty, name != ".", name != "..", !name.contains("/"), !name.contains("\0"), !name.hasPrefix("."), name != "library.json" else {
                    throw LibraryError(.library, file: path, subject: "--names", "expected names usable as directory names (no '/', not empty, not starting with '.', not library.json), found '\(name)'")
                }
                guard seen.insert(name).inserted else { throw LibraryError(.library, file: path, subject: "--names", "expected unique names, found '\(name)' twice") }
            }
        }
        let expertNames = names ?? defaultNames(count: count)

        // Validate every slot before writing anything: complete, 2-D/1-D, float, shapes that agree.
        var widths: [String: (inWidth: Int, outWidth: Int, key: String)] = [:]
        var ranks: [[String: Int]] = Array(repeating: [:], count: count)
        for module in moduleOrder {
            for index in slots[module]!.keys.sorted() {
                let slot = slots[module]![index]!
                for part in [Part.layer1, .layer2, .embedding] where slot.tensors[part.rawValue] == nil {
                    let present = slot.keys.compactMap { $0 }.joined(separator: "', '")
                    throw failure(key(module, part, index), "missing: expert \(index) has '\(present)' at module \(module) but not this tensor (each expert needs layer1, layer2 and its router embedding at every module it adapts)")
                }
                let layer1 = slot.tensors[0]!, layer2 = slot.tensors[1]!, embedding = slot.tensors[2]!
                for (part, tensor, dims) in [(Part.layer1, layer1, 2), (.layer2, layer2, 2), (.embedding, embedding, 1)] {
                    guard tensor.dtype.isComputeFloat else {
                        throw failure(slot.keys[part.rawValue], "expected F32, F16 or BF16, found \(tensor.dtype.rawValue)")
                    }
                    guard tensor.shape.count == dims, tensor.elementCount > 0 else {
                        throw failure(slot.keys[part.rawValue], "expected a non-empty \(dims)-D tensor, found shape \(tensor.shapeDescription)")
                    }
                    // Weights have an element of storage each; a view that repeats elements (stride 0) would let a
                    // tiny storage claim any size.
                    guard tensor.elementCount <= tensor.storage.count else {
                        throw failure(slot.keys[part.rawValue], "expected a tensor no larger than its storage of \(tensor.storage.count) elements, found shape \(tensor.shapeDescription) (repeated elements)")
                    }
                }
                let (inWidth, rank) = (layer1.shape[0], layer1.shape[1])
                guard layer2.shape[0] == rank else {
                    throw failure(slot.keys[1], "expected [\(rank), out] to match layer1's rank \(rank) (\(slot.keys[0]!) is \(layer1.shapeDescription)), found \(layer2.shapeDescription)")
                }
                guard embedding.shape[0] == inWidth else {
                    throw failure(slot.keys[2], "expected [\(inWidth)] to match layer1's input width (\(slot.keys[0]!) is \(layer1.shapeDescription)), found \(embedding.shapeDescription)")
                }
                let outWidth = layer2.shape[1]
                if let known = widths[module] {
                    guard known.inWidth == inWidth, known.outWidth == outWidth else {
                        throw failure(slot.keys[1], "expected module \(module) to be \(known.inWidth) -> \(known.outWidth) as for '\(known.key)', found \(inWidth) -> \(outWidth)")
                    }
                } else {
                    widths[module] = (inWidth, outWidth, slot.keys[1]!)
                }
                ranks[index][module] = rank
            }
        }

        // Write: one expert at a time into the staging directory, then validate the whole library and rename it.
        let stage = try StagedDirectory(destination: directory)
        var storageBytes: [String: UnsafeRawBufferPointer] = [:]
        var weightBytes = 0
        var dtypes = Set<String>()
        for index in 0..<count {
            let name = expertNames[index]
            let expertDirectory = try stage.directory(name)
            var adapter = SafetensorsWriter()
            var gates = SafetensorsWriter()
            let modules = moduleOrder.filter { slots[$0]![index] != nil }
            for module in modules {
                let slot = slots[module]![index]!
                var pieces: [[UInt8]] = []
                for (part, transposed) in [(Part.layer1, true), (.layer2, true), (.embedding, false)] {
                    let tensor = slot.tensors[part.rawValue]!
                    if storageBytes[tensor.storage.key] == nil { storageBytes[tensor.storage.key] = try checkpoint.bytes(of: tensor.storage) }
                    var bytes: [UInt8] = []
                    TorchCheckpoint.copyElements(of: tensor, from: storageBytes[tensor.storage.key]!, transposed: transposed, into: &bytes)
                    pieces.append(bytes)
                }
                let layer1 = slot.tensors[0]!, layer2 = slot.tensors[1]!, embedding = slot.tensors[2]!
                adapter.add("base_model.model.\(module).lora_A.weight", dtype: layer1.dtype, shape: [layer1.shape[1], layer1.shape[0]], bytes: pieces[0])
                adapter.add("base_model.model.\(module).lora_B.weight", dtype: layer2.dtype, shape: [layer2.shape[1], layer2.shape[0]], bytes: pieces[1])
                gates.add(module, dtype: embedding.dtype, shape: embedding.shape, bytes: pieces[2])
                weightBytes += pieces[0].count + pieces[1].count
                dtypes.insert(layer1.dtype.rawValue)
                dtypes.insert(layer2.dtype.rawValue)
            }
            adapter.metadata = ["format": "pt", "source": "phatgoose import-official"]
            try adapter.write(to: stage.file(name + "/adapter_model.safetensors"))
            try gates.write(to: stage.file(name + "/gates.safetensors"))
            try writeText(adapterConfig(ranks: ranks[index], modules: modules).serialized() + "\n", to: stage.file(name + "/adapter_config.json"))
            // The expert as the library loader reads it (config, pairs, shapes, finite values), then let go of it, so
            // that memory holds one expert at a time; widths across experts were checked above.
            _ = try ExpertLibrary.loadExpert(directory: expertDirectory, name: name, index: ExpertIndex(index))
            checkpoint.archive.storage.dropResidentPages()
        }
        let manifest = LibraryManifest(experts: expertNames.map { LibraryManifest.Entry(name: $0, path: $0) },
                                       routing: RoutingDefaults(router: .phatgoose, topK: min(topK, count)))
        try writeText(manifest.document().serialized() + "\n", to: stage.file("library.json"))
        _ = try LibraryManifest(path: stage.path + "/library.json")
        try stage.commit()
        return Summary(experts: expertNames, modules: moduleOrder.count, weightBytes: weightBytes, dtypes: dtypes.sorted(), ignoredKeys: ignored)
    }

    /// A PEFT LoRA config: `r` the expert's most common rank (the lowest on a tie), `rank_pattern` for modules of
    /// another rank, `lora_alpha` 1 so that scale = 1/r at every module, as the official code divides by the rank.
    private static func adapterConfig(ranks: [String: Int], modules: [String]) -> JSONValue {
        var tally: [Int: Int] = [:]
        for rank in ranks.values { tally[rank, default: 0] += 1 }
        let rank = tally.max { ($0.value, -$0.key) < ($1.value, -$1.key) }!.key
        let pattern = modules.filter { ranks[$0]! != rank }.map { module in
            (key: regexEscaped(module), value: JSONValue.integer(ranks[module]!))
        }
        return .object([
            ("peft_type", .string("LORA")),
            ("task_type", .string("SEQ_2_SEQ_LM")),
            ("r", .integer(rank)),
            ("lora_alpha", .integer(1)),
            ("use_rslora", .bool(false)),
            ("target_modules", .array(modules.map { .string($0) })),
            ("rank_pattern", .object(pattern)),
            ("alpha_pattern", .object([])),
            ("fan_in_fan_out", .bool(false)),
            ("bias", .string("none")),
            ("lora_dropout", .double(0)),
        ])
    }

    private static func regexEscaped(_ text: String) -> String {
        var result = ""
        for character in text {
            if "\\^$.|?*+()[]{}".contains(character) { result.append("\\") }
            result.append(character)
        }
        return result
    }

    private static func writeText(_ text: String, to path: String) throws(FormatError) {
        let file = try AtomicFile(path: path)
        try file.write(Array(text.utf8))
        try file.commit()
    }
}
