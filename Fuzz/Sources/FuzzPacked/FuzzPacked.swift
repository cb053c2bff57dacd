import PhatgooseFormats
import PhatgooseLibrary

/// Any bytes as a packed library: load or throw; an accepted library's tensors must be readable in bounds.
func fuzzPacked(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let storage = MappedFile(copying: UnsafeRawBufferPointer(start: data, count: size), path: "fuzz.phatpack")
    guard let library = try? ExpertLibrary.loadPacked(storage) else { return 0 }
    for module in library.modules {
        for piece in module.experts {
            _ = piece.a.floats()
            _ = piece.bTransposed.floats()
            _ = piece.gate.floats()
        }
    }
    return 0
}
