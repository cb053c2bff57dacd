import PhatgooseFormats
import PhatgooseLibrary

/// Any bytes as adapter_config.json: parse, validate, and use the patterns against module names.
func fuzzAdapterConfig(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard let document = try? JSONParser.parse(UnsafeRawBufferPointer(start: data, count: size)),
          let config = try? AdapterConfig(document: document, file: "adapter_config.json")
    else { return 0 }
    for module in ["encoder.block.0.layer.0.SelfAttention.q", "decoder.block.11.layer.2.DenseReluDense.wo", "o", ""] {
        _ = config.rank(for: module)
        _ = config.scale(for: module)
        _ = config.targets(module)
    }
    return 0
}
