import CPhatgooseKernels
import Foundation
import PhatgooseFormats

/// Load rules for a library directory (see also ``AdapterConfig`` and ``LibraryManifest``):
/// 1. With `library.json`, its experts in order; without, every subdirectory holding `adapter_config.json`, in byte
///    order of the directory names. An expert directory must exist and stay inside the library (symlinks included).
/// 2. Each expert has `adapter_config.json`, `adapter_model.safetensors` and `gates.safetensors`.
/// 3. Adapter keys are `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r], both
///    present for each module, both rank 2, F32/F16/BF16, with r equal to the config's rank for the module and the
///    module selected by `target_modules`. Any other key is refused, naming what it is (DoRA magnitude, LoRA bias,
///    `modules_to_save`, embedding LoRA, unknown), because the runtime would ignore it.
/// 4. `gates.safetensors` holds exactly one key per adapted module, shape [in], F32/F16/BF16.
/// 5. No NaN or infinity in any weight or gate.
/// 6. A module's input and output widths agree across all experts that adapt it.
extension ExpertLibrary {
    static let adapterPrefix = "base_model.model."

    /// True when `path` is a directory (following symlinks).
    public static func isDirectory(_ path: String) -> Bool {
        var isDirectory: ObjCBool = false
        return FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) && isDirectory.boolValue
    }

    /// Loads a library directory.
    public static func loadDirectory(_ root: String) throws -> ExpertLibrary {
        let manifestPath = root + "/library.json"
        let manifest: LibraryManifest
        if FileManager.default.fileExists(atPath: manifestPath) {
            manifest = try LibraryManifest(path: manifestPath)
        } else {
            manifest = LibraryManifest(experts: try scanExperts(root), routing: RoutingDefaults())
        }
        guard let realRoot = realPath(root) else {
            throw LibraryError(.library, file: root, "cannot resolve the library directory")
        }
        var experts: [ExpertInfo] = []
        var pieces: [String: [ModuleExpert]] = [:]
        var widths: [String: (inWidth: Int, outWidth: Int, expert: String)] = [:]
        for (i, entry) in manifest.experts.enumerated() {
            let directory = root + "/" + entry.path
            guard isDirectory(directory) else {
                throw LibraryError(.manifest, file: manifestPath, subject: "expert \"\(entry.name)\"", "expected a directory at \"\(entry.path)\", found none")
            }
            guard let real = realPath(directory), real.hasPrefix(realRoot + "/") else {
                throw LibraryError(.manifest, file: manifestPath, subject: "expert \"\(entry.name)\"", "expected a path inside the library directory, found \"\(entry.path)\" leading outside it")
            }
            let config = try AdapterConfig(path: directory + "/adapter_config.json")
            let expert = ExpertInfo(name: entry.name, path: entry.path, config: config)
            let modules = try loadExpertModules(expert, index: ExpertIndex(i), directory: directory)
            for (module, piece) in modules {
                let inWidth = piece.a.shape[1], outWidth = piece.bTransposed.shape[1]
                if let known = widths[module] {
                    guard known.inWidth == inWidth, known.outWidth == outWidth else {
                        throw LibraryError(.mismatch, file: directory + "/adapter_model.safetensors", subject: "expert \"\(entry.name)\", module \(module)",
                                           "expected in \(known.inWidth), out \(known.outWidth) as expert \"\(known.expert)\" has, found in \(inWidth), out \(outWidth)")
                    }
                } else {
                    widths[module] = (inWidth, outWidth, entry.name)
                }
                pieces[module, default: []].append(piece)
            }
            experts.append(expert)
        }
        let modules = try ModuleOrder.sorted(Array(pieces.keys)).map { name throws in
            let candidates = pieces[name]!
            let w = widths[name]!
            return RoutedModule(name: name, inWidth: w.inWidth, outWidth: w.outWidth, experts: candidates,
                                gateMatrix: GateMatrixBuilder.build(candidates.map(\.gate), inWidth: w.inWidth))
        }
        return ExpertLibrary(source: .directory(root), experts: experts, modules: modules, routing: manifest.routing)
    }

    /// The directory-scan rule: subdirectories holding `adapter_config.json`, in byte order of their names.
    static func scanExperts(_ root: String) throws -> [LibraryManifest.Entry] {
        let names: [String]
        do {
            names = try FileManager.default.contentsOfDirectory(atPath: root)
        } catch {
            throw LibraryError(.library, file: root, "cannot list the directory: \(error.localizedDescription)")
        }
        let experts = names.filter { FileManager.default.fileExists(atPath: root + "/" + $0 + "/adapter_config.json") }
            .sorted { Array($0.utf8).lexicographicallyPrecedes(Array($1.utf8)) }
        guard !experts.isEmpty else {
            throw LibraryError(.library, file: root, "expected library.json or expert subdirectories holding adapter_config.json, found neither")
        }
        return experts.map { LibraryManifest.Entry(name: $0, path: $0) }
    }

    static func realPath(_ path: String) -> String? {
        guard let resolved = realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    /// What an adapter key is, by PEFT's naming.
    enum AdapterKey: Equatable {
        case loraA(String)
        case loraB(String)
        case refused(String)
    }

    static func classify(_ key: String) -> AdapterKey {
        guard key.hasPrefix(adapterPrefix) else { return .refused("a key outside \"\(adapterPrefix)\"") }
        let rest = String(key.dropFirst(adapterPrefix.count))
        if rest.contains("modules_to_save") { return .refused("a modules_to_save weight") }
        if rest.contains("lora_magnitude_vector") { return .refused("a DoRA magnitude vector") }
        if rest.contains("lora_embedding_") { return .refused("an embedding LoRA weight") }
        for (suffix, isA) in [(".lora_A.weight", true), (".lora_B.weight", false)] where rest.hasSuffix(suffix) {
            let module = String(rest.dropLast(suffix.count))
            guard !module.isEmpty else { break }
            return isA ? .loraA(module) : .loraB(module)
        }
        if rest.hasSuffix(".bias") { return .refused("a bias") }
        return .refused("an unknown tensor")
    }

    /// Loads and validates one expert directory (config, adapter, gates) as expert `index`, by the directory rules;
    /// for adding an expert to a running library.
    public static func loadExpert(directory: String, name: String, index: ExpertIndex) throws -> (ExpertInfo, [(module: String, piece: ModuleExpert)]) {
        let config = try AdapterConfig(path: directory + "/adapter_config.json")
        let expert = ExpertInfo(name: name, path: directory, config: config)
        return (expert, try loadExpertModules(expert, index: index, directory: directory).map { (module: $0.0, piece: $0.1) })
    }

    static func loadExpertModules(_ expert: ExpertInfo, index: ExpertIndex, directory: String) throws -> [(String, ModuleExpert)] {
        let adapterPath = directory + "/adapter_model.safetensors"
        let gatesPath = directory + "/gates.safetensors"
        let adapter = try SafetensorsFile(path: adapterPath)
        let gates = try SafetensorsFile(path: gatesPath)
        let who = "expert \"\(expert.name)\""
        var aViews: [String: TensorView] = [:]
        var bViews: [String: TensorView] = [:]
        for info in adapter.tensors {
            switch classify(info.name) {
            case let .loraA(module): aViews[module] = adapter.view(info)
            case let .loraB(module): bViews[module] = adapter.view(info)
            case let .refused(why):
                throw LibraryError(.adapter, file: adapterPath, subject: "\(who), tensor '\(info.name)'",
                                   "expected only base_model.model.<module>.lora_A.weight and .lora_B.weight, found \(why), which PHATGOOSE routing would ignore")
            }
        }
        for module in bViews.keys where aViews[module] == nil {
            throw LibraryError(.adapter, file: adapterPath, subject: "\(who), module \(module)", "expected lora_A with lora_B, found lora_B only")
        }
        var result: [(String, ModuleExpert)] = []
        for module in ModuleOrder.sorted(Array(aViews.keys)) {
            let a = aViews[module]!
            let subject = "\(who), module \(module)"
            guard let b = bViews[module] else {
                throw LibraryError(.adapter, file: adapterPath, subject: subject, "expected lora_B with lora_A, found lora_A only")
            }
            guard expert.config.targets(module) else {
                throw LibraryError(.config, file: directory + "/adapter_config.json", subject: "\(who), field \"target_modules\"", "expected it to select module \(module), which the adapter holds; found it does not")
            }
            for view in [a, b] {
                guard view.info.dtype.isComputeFloat else {
                    throw LibraryError(.adapter, file: adapterPath, subject: "\(who), tensor '\(view.info.name)'", "expected dtype F32, F16 or BF16, found \(view.info.dtype.rawValue)")
                }
                guard view.info.shape.count == 2 else {
                    throw LibraryError(.adapter, file: adapterPath, subject: "\(who), tensor '\(view.info.name)'", "expected a matrix (rank 2), found shape \(view.info.shapeDescription)")
                }
            }
            let rank = expert.config.rank(for: module)
            let (rankA, inWidth) = (a.info.shape[0], a.info.shape[1])
            let (outWidth, rankB) = (b.info.shape[0], b.info.shape[1])
            guard rankA == rank, rankB == rank else {
                throw LibraryError(.adapter, file: adapterPath, subject: subject, "expected rank \(rank) from adapter_config.json, found lora_A \(a.info.shapeDescription) and lora_B \(b.info.shapeDescription)")
            }
            guard inWidth > 0, outWidth > 0 else {
                throw LibraryError(.adapter, file: adapterPath, subject: subject, "expected positive widths, found in \(inWidth), out \(outWidth)")
            }
            guard let gate = gates.tensor(named: module) else {
                throw LibraryError(.gate, file: gatesPath, subject: subject, "expected a gate vector for the module, found none")
            }
            guard gate.info.dtype.isComputeFloat else {
                throw LibraryError(.gate, file: gatesPath, subject: subject, "expected dtype F32, F16 or BF16, found \(gate.info.dtype.rawValue)")
            }
            guard gate.info.shape == [inWidth] else {
                throw LibraryError(.gate, file: gatesPath, subject: subject, "expected shape [\(inWidth)] (the module's input width), found \(gate.info.shapeDescription)")
            }
            for (view, file) in [(a, adapterPath), (b, adapterPath), (gate, gatesPath)] {
                let bad = view.nonFiniteCount()
                guard bad == 0 else {
                    throw LibraryError(.values, file: file, subject: "\(who), tensor '\(view.info.name)'", "expected finite values, found \(bad) NaN or infinite")
                }
            }
            let piece = ModuleExpert(
                expert: index, rank: rank, alpha: expert.config.alpha(for: module),
                scale: Float(expert.config.scale(for: module)),
                a: WeightTensor(a), bTransposed: transpose(WeightTensor(b)), gate: WeightTensor(gate))
            result.append((module, piece))
        }
        for info in gates.tensors where aViews[info.name] == nil {
            throw LibraryError(.gate, file: gatesPath, subject: "\(who), gate '\(info.name)'", "expected a gate only for a module the adapter holds, found one for a module it does not")
        }
        return result
    }

    /// A copy of a matrix, transposed, in the same dtype.
    static func transpose(_ matrix: WeightTensor) -> WeightTensor {
        let rows = matrix.shape[0], columns = matrix.shape[1]
        let buffer = HeapBuffer(byteCount: matrix.byteCount)
        func run<T>(_: T.Type) {
            let destination = buffer.pointer.bindMemory(to: T.self, capacity: rows * columns)
            for row in 0..<rows {
                for column in 0..<columns {
                    destination[column * rows + row] = matrix.pointer.loadUnaligned(fromByteOffset: (row * columns + column) * MemoryLayout<T>.size, as: T.self)
                }
            }
        }
        if matrix.dtype.size == 2 { run(UInt16.self) } else { run(UInt32.self) }
        return WeightTensor(dtype: matrix.dtype, shape: [columns, rows], owner: buffer, pointer: UnsafeRawPointer(buffer.pointer))
    }
}

/// Builds the normalised gate matrix of a module; the one place this is computed, so directory and packed loads
/// route identically.
enum GateMatrixBuilder {
    static let layerNormEpsilon: Float = 1e-5

    static func build(_ gates: [WeightTensor], inWidth: Int) -> WeightTensor {
        let count = gates.count * inWidth
        let buffer = HeapBuffer(byteCount: count * 4)
        let matrix = buffer.pointer.bindMemory(to: Float.self, capacity: max(count, 1))
        for (row, gate) in gates.enumerated() {
            pg_convert_to_f32(gate.pointer, gate.kernelDType, matrix + row * inWidth, inWidth)
        }
        pg_layernorm_rows(matrix, inWidth, gates.count, inWidth, layerNormEpsilon, matrix, inWidth)
        let scale = Float(1.0 / Double(inWidth).squareRoot())
        for i in 0..<count { matrix[i] *= scale }
        return WeightTensor(dtype: .f32, shape: [gates.count, inWidth], owner: buffer, pointer: UnsafeRawPointer(buffer.pointer))
    }
}
