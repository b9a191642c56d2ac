import Events
import Machine
import Testing
@testable import VMM

@Suite struct FlagParsingTests {
    @Test(arguments: [("boot=1", 1), ("boot=2", 2), ("boot=8", 8), ("boot=254", 254)])
    func cpusAcceptsBootCounts(text: String, count: Int) throws {
        #expect(try VMConfiguration.parseCPUs(text) == count)
    }

    @Test(arguments: ["boot=0", "boot=255", "boot=two", "2", "max=2", "boot=2,boot=3", "", "boot=2,"])
    func cpusRefusesBadValuesNamingTheFlag(text: String) {
        #expect {
            _ = try VMConfiguration.parseCPUs(text)
        } throws: { error in
            "\(error)".hasPrefix("--cpus: ")
        }
    }

    /// Cloud Hypervisor's other keys: accepted where they ask for nothing Ferry lacks, refused
    /// naming the key (and why) where they do.
    @Test func cloudHypervisorsOtherCPUAndMemoryKeys() throws {
        #expect(try VMConfiguration.parseCPUs("boot=2,max=2,kvm_hyperv=off,nested=off") == 2)
        #expect(try VMConfiguration.parseMemory("size=1G,shared=off,hugepages=off,mergeable=off,thp=on,prefault=off,hotplug_size=0") == (1 << 30, false))
        #expect(try VMConfiguration.parseMemory("size=1G,shared=on") == (1 << 30, true))
        let refused: [(String, String)] = [
            ("boot=2,max=4", "--cpus: max=4: Ferry has no CPU hotplug"),
            ("boot=2,topology=1:2:1:1", "--cpus: topology=1:2:1:1 is not supported"),
            ("boot=2,kvm_hyperv=on", "--cpus: kvm_hyperv=on is not supported: Ferry offers no Hyper-V"),
            ("boot=2,affinity=[0@[0]]", "--cpus: affinity=[0@[0]] is not supported"),
        ]
        for (text, message) in refused {
            #expect { _ = try VMConfiguration.parseCPUs(text) } throws: { "\($0)".hasPrefix(message) }
        }
        for (text, message) in [("size=1G,hugepages=on", "--memory: hugepages=on is not supported"),
                                ("size=1G,thp=off", "--memory: thp=off is not supported"),
                                ("size=1G,hotplug_size=1G", "--memory: hotplug_size=1G is not supported: Ferry has no memory hotplug")] {
            #expect { _ = try VMConfiguration.parseMemory(text) } throws: { "\($0)".hasPrefix(message) }
        }
    }

    @Test(arguments: [("size=64M", UInt64(64) << 20), ("size=1G", 1 << 30), ("size=8G", 8 << 30),
                      ("size=524288K", 512 << 20), ("size=1073741824", 1 << 30), ("size=2g", 2 << 30)])
    func memoryAcceptsCloudHypervisorSizes(text: String, bytes: UInt64) throws {
        #expect(try VMConfiguration.parseMemory(text) == (bytes, false))
    }

    @Test(arguments: ["size=32M", "size=", "size=1X", "size=-1G", "1G", "size=1G,shared=yes", "size=99999999999T", "size=4097"])
    func memoryRefusesBadValuesNamingTheFlag(text: String) {
        #expect {
            _ = try VMConfiguration.parseMemory(text)
        } throws: { error in
            "\(error)".hasPrefix("--memory: ")
        }
    }

    @Test func serialModesParse() throws {
        #expect(try SerialMode(parsing: "tty") == .tty)
        #expect(try SerialMode(parsing: "off") == .off)
        #expect(try SerialMode(parsing: "null") == .null)
        #expect(try SerialMode(parsing: "file=/tmp/console.log") == .file("/tmp/console.log"))
        #expect(try SerialMode(parsing: "pty") == .pty)
        #expect(try SerialMode(parsing: "socket=/tmp/serial.sock") == .socket("/tmp/serial.sock"))
        for bad in ["ptty", "file=", "socket=", "file=/a,socket=/b", "tty,off", ""] {
            #expect(throws: ConfigurationError.self) { try SerialMode(parsing: bad) }
        }
    }

    @Test func consoleModesParseAndErrorsNameTheFlag() throws {
        #expect(try SerialMode(parsing: "file=/tmp/vc.log", flag: "--console") == .file("/tmp/vc.log"))
        #expect(try SerialMode(parsing: "pty", flag: "--console") == .pty)
        #expect {
            _ = try SerialMode(parsing: "socket=/tmp/c.sock", flag: "--console")
        } throws: { "\($0)".hasPrefix("--console: ") }
    }

    @Test func diskFlagParsesCloudHypervisorsKeys() throws {
        #expect(try DiskConfiguration(parsing: "path=/tmp/a.img", index: 0)
                == DiskConfiguration(id: "disk0", path: "/tmp/a.img"))
        #expect(try DiskConfiguration(parsing: "path=/tmp/b.img,readonly=on,id=root,direct=on", index: 1)
                == DiskConfiguration(id: "root", path: "/tmp/b.img", readOnly: true, direct: true))
        for bad in ["/tmp/a.img", "path=", "path=/a,readonly=yes", "path=/a,size=1G", "id=x"] {
            #expect {
                _ = try DiskConfiguration(parsing: bad, index: 0)
            } throws: { "\($0)".hasPrefix("--disk: ") }
        }
    }

    @Test func netFlagParsesCloudHypervisorsKeys() throws {
        let card = try NetworkConfiguration(parsing: "tap=tap7,mac=52:54:00:AB:cd:01,ip=10.1.2.1,mask=255.255.255.0,queue_size=512", index: 0)
        #expect(card.id == "net0" && card.tap == "tap7" && card.mac.description == "52:54:00:ab:cd:01")
        #expect(card.hostAddress == "10.1.2.1" && card.hostNetmask == "255.255.255.0" && card.queueSize == 512)
        #expect(card.offloadTSO && card.offloadUFO && card.offloadChecksum)
        let inherited = try NetworkConfiguration(parsing: "fd=[5],id=uplink,num_queues=2,offload_tso=off", index: 3)
        #expect(inherited.fd == 5 && inherited.tap == nil && inherited.id == "uplink" && !inherited.offloadTSO)
        let random = try NetworkConfiguration(parsing: "tap=t", index: 1)
        #expect(!random.mac.isMulticast && random.mac.bytes[0] & 2 != 0, "a random MAC is locally administered unicast")
        for (bad, message) in [("mac=52:54:00:00:00:01", "write tap=NAME or fd=N"), ("tap=t,mac=52:54:00:00:01", "is not a MAC address"),
                               ("tap=t,mac=01:00:5e:00:00:01", "multicast"), ("tap=t,queue_size=100", "not a power of two"),
                               ("tap=t,queue_size=2048", "not a power of two"), ("tap=t,num_queues=4", "one queue pair"),
                               ("fd=1", "above 2"), ("fd=[3,4]", "write tap=NAME or fd=N"), ("tap=t,ip=10.0.0", "not an IPv4 address"),
                               ("tap=t,vhost_user=on", "vhost_user"), ("tap=t,offload_csum=maybe", "must be on or off")] {
            #expect {
                _ = try NetworkConfiguration(parsing: bad, index: 0)
            } throws: { error in
                "\(error)".contains("--net") && "\(error)".contains(message)
            }
        }
    }

    @Test func rngFlagNeedsASource() throws {
        #expect(try parseEntropySource("src=/dev/urandom") == "/dev/urandom")
        #expect(throws: ConfigurationError.self) { try parseEntropySource("/dev/urandom") }
    }

    @Test func eventMonitorAcceptsPathAndFD() throws {
        #expect(try VMConfiguration.parseEventMonitor("path=/tmp/x.events") == .path("/tmp/x.events"))
        #expect(try VMConfiguration.parseEventMonitor("fd=3") == .fileDescriptor(3))
        #expect {
            _ = try VMConfiguration.parseEventMonitor("socket=/x")
        } throws: { "\($0)".hasPrefix("--event-monitor: ") }
    }
}
