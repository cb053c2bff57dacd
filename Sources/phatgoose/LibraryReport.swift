import Foundation
import PhatgooseFormats
import PhatgooseLibrary

/// What `inspect` reports, built once as JSON and rendered as JSON or text.
enum LibraryReport {
    static func describe(_ library: ExpertLibrary) -> JSONValue {
        var expertModules = [Int](repeating: 0, count: library.experts.count)
        var expertBytes = [Int](repeating: 0, count: library.experts.count)
        let modules: [JSONValue] = library.modules.map { module in
            .object([
                ("name", .string(module.name)),
                ("in", .integer(module.inWidth)),
                ("out", .integer(module.outWidth)),
                ("experts", .array(module.experts.map { piece in
                    expertModules[piece.expert.int] += 1
                    expertBytes[piece.expert.int] += piece.byteCount
                    return .object([
                        ("expert", .integer(piece.expert.int)),
                        ("rank", .integer(piece.rank)),
                        ("alpha", .double(piece.alpha)),
                        ("scale", .double(Double(piece.scale))),
                        ("dtypes", .object([
                            ("lora_A", .string(piece.a.dtype.rawValue)),
                            ("lora_B", .string(piece.bTransposed.dtype.rawValue)),
                            ("gate", .string(piece.gate.dtype.rawValue)),
                        ])),
                        ("bytes", .integer(piece.byteCount)),
                    ])
                })),
            ])
        }
        let experts: [JSONValue] = library.experts.enumerated().map { i, expert in
            .object([
                ("index", .integer(i)),
                ("name", .string(expert.name)),
                ("path", .string(expert.path)),
                ("r", .integer(expert.config.rank)),
                ("lora_alpha", .double(expert.config.alpha)),
                ("use_rslora", .bool(expert.config.useRSLoRA)),
                ("fan_in_fan_out", .bool(expert.config.fanInFanOut)),
                ("modules", .integer(expertModules[i])),
                ("bytes", .integer(expertBytes[i])),
            ])
        }
        let kind: String
        switch library.source {
        case .directory: kind = "directory"
        case .packed: kind = "packed"
        }
        return .object([
            ("kind", .string("library")),
            ("source", .object([("type", .string(kind)), ("path", .string(library.source.path))])),
            ("routing", .object([("router", .string(library.routing.router.rawValue)), ("top_k", .integer(library.routing.topK))])),
            ("bytes", .integer(library.weightByteCount)),
            ("experts", .array(experts)),
            ("modules", .array(modules)),
        ])
    }

    static func describe(_ file: SafetensorsFile) -> JSONValue {
        var members: [(key: String, value: JSONValue)] = [
            ("kind", .string("safetensors")),
            ("path", .string(file.path)),
            ("tensors", .array(file.tensors.map { info in
                .object([
                    ("name", .string(info.name)),
                    ("dtype", .string(info.dtype.rawValue)),
                    ("shape", .array(info.shape.map { JSONValue.integer($0) })),
                    ("bytes", .integer(info.dataOffsets.count)),
                ])
            })),
        ]
        if let metadata = file.metadata {
            members.append(("metadata", .object(metadata.sorted { $0.key < $1.key }.map { ($0.key, JSONValue.string($0.value)) })))
        }
        return .object(members)
    }

    static func text(_ report: JSONValue) -> String {
        var out = ""
        if case .string("safetensors")? = report["kind"] {
            guard case let .array(tensors)? = report["tensors"] else { return out }
            out += "safetensors \(report["path"].string): \(tensors.count) tensors\n"
            for tensor in tensors {
                out += "  \(tensor["name"].string)  \(tensor["dtype"].string)  \(tensor["shape"]?.serialized() ?? "")  \(tensor["bytes"].string) bytes\n"
            }
            return out
        }
        guard case let .array(experts)? = report["experts"], case let .array(modules)? = report["modules"] else { return out }
        out += "library \(report["source"]?["path"].string ?? "") (\(report["source"]?["type"].string ?? ""))\n"
        out += "  experts \(experts.count), modules \(modules.count), routing \(report["routing"]?["router"].string ?? "") top-\(report["routing"]?["top_k"].string ?? ""), \(formatBytes(report["bytes"].int))\n"
        out += "experts:\n"
        for expert in experts {
            out += "  \(expert["index"].string)  \(expert["name"].string)  r=\(expert["r"].string) lora_alpha=\(expert["lora_alpha"].string) rslora=\(expert["use_rslora"].string) fan_in_fan_out=\(expert["fan_in_fan_out"].string)  modules \(expert["modules"].string)  \(formatBytes(expert["bytes"].int))\n"
        }
        out += "modules:\n"
        for module in modules {
            guard case let .array(pieces)? = module["experts"] else { continue }
            let ranks = Set(pieces.map { $0["rank"].string }).sorted()
            let scales = Set(pieces.map { $0["scale"].string }).sorted()
            let dtypes = Set(pieces.map { p in ["lora_A", "lora_B", "gate"].map { p["dtypes"]?[$0].string ?? "" }.joined(separator: "/") }).sorted()
            let bytes = pieces.reduce(0) { $0 + $1["bytes"].int }
            out += "  \(module["name"].string)  in \(module["in"].string) out \(module["out"].string)  experts \(pieces.count)  rank \(ranks.joined(separator: ",")) scale \(scales.joined(separator: ","))  A/B/gate \(dtypes.joined(separator: ","))  \(formatBytes(bytes))\n"
        }
        return out
    }

    static func formatBytes(_ bytes: Int) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(bytes)
        var unit = 0
        while value >= 1024, unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        return unit == 0 ? "\(bytes) B" : String(format: "%.1f", value) + " " + units[unit]
    }
}

extension Optional where Wrapped == JSONValue {
    /// Text of a scalar JSON value, for the text report.
    var string: String {
        switch self {
        case let .string(s)?: return s
        case let .number(n)?: return n.text
        case let .bool(b)?: return b ? "true" : "false"
        default: return ""
        }
    }

    var int: Int {
        if case let .number(n)? = self, let v = n.int64 { return Int(v) }
        return 0
    }
}
