import Foundation
import PhatgooseFormats

/// A small library written to disk in the PEFT layout, with hooks to break it.
struct LibraryFixture {
    struct Tensor {
        var shape: [Int]
        var values: [Float]
        var dtype: DType = .f32
    }

    struct Expert {
        var name: String
        var modules: [(name: String, inWidth: Int, outWidth: Int)]
        var rank = 4
        /// Extra or replacing adapter_config.json fields, as raw JSON values.
        var config: [String: String] = [:]
        var adapter: [String: Tensor] = [:]
        var gates: [String: Tensor] = [:]
        var configText: String? = nil
    }

    var experts: [Expert]
    /// Raw library.json text; nil for no manifest.
    var manifest: String?

    static let defaultModules: [(name: String, inWidth: Int, outWidth: Int)] = [
        ("encoder.block.0.layer.0.SelfAttention.q", 16, 16),
        ("encoder.block.0.layer.1.DenseReluDense.wo", 24, 16),
    ]

    /// `count` experts over the default modules, with deterministic values, and a manifest.
    static func standard(experts count: Int = 3, rank: Int = 4) -> LibraryFixture {
        var experts: [Expert] = []
        for e in 0..<count {
            var expert = Expert(name: "e\(e)", modules: defaultModules, rank: rank)
            expert.fill(seed: e)
            experts.append(expert)
        }
        let entries = experts.map { #"{"name":"\#($0.name)","path":"\#($0.name)"}"# }.joined(separator: ",")
        return LibraryFixture(experts: experts, manifest: #"{"format":"phatgoose-library","version":1,"experts":[\#(entries)],"routing":{"router":"phatgoose","top_k":2}}"#)
    }

    func write(to root: String) {
        try? FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        if let manifest { writeText(manifest, to: root + "/library.json") }
        for expert in experts {
            let directory = root + "/" + expert.name
            try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            var fields: [String: String] = [
                "peft_type": "\"LORA\"", "r": "\(expert.rank)", "lora_alpha": "8", "use_rslora": "false",
                "target_modules": "[\"q\",\"wo\"]", "fan_in_fan_out": "false", "bias": "\"none\"",
                "modules_to_save": "null", "task_type": "\"SEQ_2_SEQ_LM\"", "some_future_field": "{\"x\": [1]}",
            ]
            for (key, value) in expert.config { fields[key] = value }
            let text = expert.configText ?? "{" + fields.sorted { $0.key < $1.key }.map { "\"\($0.key)\": \($0.value)" }.joined(separator: ", ") + "}"
            writeText(text, to: directory + "/adapter_config.json")
            for (file, tensors) in [("adapter_model.safetensors", expert.adapter), ("gates.safetensors", expert.gates)] {
                var writer = SafetensorsWriter()
                for (name, tensor) in tensors.sorted(by: { $0.key < $1.key }) {
                    writer.add(name, floats: tensor.values, shape: tensor.shape, as: tensor.dtype)
                }
                try! writer.write(to: directory + "/" + file)
            }
        }
    }
}

extension LibraryFixture.Expert {
    static func aKey(_ module: String) -> String { "base_model.model.\(module).lora_A.weight" }
    static func bKey(_ module: String) -> String { "base_model.model.\(module).lora_B.weight" }

    /// Deterministic, distinct values for every module's A, B and gate.
    mutating func fill(seed: Int) {
        for (m, module) in modules.enumerated() {
            func values(_ count: Int, _ salt: Int) -> [Float] {
                (0..<count).map { i in Float(sin(Double(i * 7 + salt * 131 + seed * 977 + m * 53) * 0.37)) * 0.5 }
            }
            adapter[Self.aKey(module.name)] = .init(shape: [rank, module.inWidth], values: values(rank * module.inWidth, 1))
            adapter[Self.bKey(module.name)] = .init(shape: [module.outWidth, rank], values: values(module.outWidth * rank, 2))
            gates[module.name] = .init(shape: [module.inWidth], values: values(module.inWidth, 3))
        }
    }
}
