/// The test guest's console lines, parsed (formats in Guests/test-guest/README.md).
struct Heartbeat: Equatable {
    var cpu: Int
    var seq: Int
    var ticks: Int
    var sum: String
    var written: Int

    /// Parses `HEARTBEAT cpu=C seq=N ticks=T sum=H written=W`.
    init?(_ line: String) {
        guard line.hasPrefix("HEARTBEAT ") else { return nil }
        let fields = keyValues(line)
        guard let cpu = fields["cpu"].flatMap(Int.init), let seq = fields["seq"].flatMap(Int.init),
              let ticks = fields["ticks"].flatMap(Int.init), let sum = fields["sum"],
              let written = fields["written"].flatMap(Int.init)
        else { return nil }
        (self.cpu, self.seq, self.ticks, self.sum, self.written) = (cpu, seq, ticks, sum, written)
    }
}

/// `key=value` fields of a console line.
func keyValues(_ line: String) -> [String: String] {
    var fields: [String: String] = [:]
    for word in line.split(separator: " ") {
        let parts = word.split(separator: "=", maxSplits: 1)
        if parts.count == 2 { fields[String(parts[0])] = String(parts[1]) }
    }
    return fields
}

extension Array where Element == String {
    var heartbeats: [Heartbeat] { compactMap(Heartbeat.init) }
    func verifyOK(cpu: Int) -> [String] { filter { $0.hasPrefix("VERIFY OK cpu=\(cpu) ") } }
    var verifyFailures: [String] { filter { $0.hasPrefix("VERIFY FAIL") } }
}
