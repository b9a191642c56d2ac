import NIOCore
import Synchronization

/// Holds the API server to `APIServer.maximumConnections` open connections: one over the limit is
/// closed as soon as it opens, before anything of it is read. A client that holds many idle
/// connections can then take no more than that from the VMM.
final class ConnectionLimit: ChannelInboundHandler, RemovableChannelHandler, Sendable {
    typealias InboundIn = NIOAny

    /// The connections open now, shared by every connection's handler.
    final class Count: Sendable {
        let open = Mutex(0)
        let limit: Int

        init(limit: Int) {
            self.limit = limit
        }
    }

    private let count: Count
    private let counted = Mutex(false)

    init(_ count: Count) {
        self.count = count
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let admitted = count.open.withLock { open in
            guard open < count.limit else { return false }
            open += 1
            return true
        }
        counted.withLock { $0 = admitted }
        if !admitted { context.close(promise: nil) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        let wasCounted = counted.withLock { counted in
            defer { counted = false }
            return counted
        }
        if wasCounted { count.open.withLock { $0 -= 1 } }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        context.fireChannelRead(data)
    }
}
