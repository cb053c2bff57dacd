import PhatgooseFormats

/// Any bytes: the reader must either validate them or throw, never crash, hang or read out of bounds; every tensor
/// it accepts must then be readable.
func fuzzSafetensors(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let storage = MappedFile(copying: UnsafeRawBufferPointer(start: data, count: size), path: "fuzz.safetensors")
    guard let file = try? SafetensorsFile(storage: storage) else { return 0 }
    for info in file.tensors {
        let view = file.view(info)
        if info.dtype.isComputeFloat {
            _ = try? view.floats()
            _ = view.nonFiniteCount()
        } else if info.dtype == .i32 {
            _ = try? view.int32s()
        }
    }
    return 0
}
