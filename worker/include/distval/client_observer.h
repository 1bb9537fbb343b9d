// ClientObserver: sees every request a Client sends to a shard and every
// reply it receives, for metrics and timelines (WorkerTelemetry implements
// it). Set ClientOptions::observer.
//
// Both methods run on the client's I/O thread, in the order the messages
// went out and came in; they must be quick and must not call the Client.
// Heartbeats are not reported; replies to them are (with a request id the
// observer never saw: ignore those).
#ifndef DISTVAL_CLIENT_OBSERVER_H_
#define DISTVAL_CLIENT_OBSERVER_H_

#include "distval/protocol.h"
#include "distval/transport.h"

namespace distval {

class ClientObserver {
 public:
  virtual ~ClientObserver() = default;
  // `request` is about to be sent to `shard` as `message` (header frame
  // first, then the payload frames).
  virtual void OnSend(int shard, const protocol::Request& request,
                      const transport::OutMessage& message) = 0;
  // `reply` came from `shard` in `message` (header frame first).
  virtual void OnReply(int shard, const protocol::Reply& reply,
                       const transport::InMessage& message) = 0;
};

}  // namespace distval

#endif  // DISTVAL_CLIENT_OBSERVER_H_
