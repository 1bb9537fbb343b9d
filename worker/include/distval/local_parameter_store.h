// NewLocalParameterStore: the variables of a ParameterServerStrategy held in
// this process, updated with the parameter servers' own optimizer code
// (ps/optimizer.h) and initializers (ps/initializer.h). This is the
// single-process baseline (`distval-worker --local`): the same strategy, the
// same replicas and the same update rule as a distributed run, without the
// network. With one worker it behaves like BSP: every push is applied
// before the next pull, and the clock advances on every push.
//
// Link: distval_worker_local_dep (it pulls in the parameter-server core
// library; libdistval-worker itself does not depend on ps/).
//
// Thread-safety: as ParameterStore (one thread at a time).
#ifndef DISTVAL_LOCAL_PARAMETER_STORE_H_
#define DISTVAL_LOCAL_PARAMETER_STORE_H_

#include <memory>

#include "distval/parameter_store.h"

namespace distval {

// A new, empty in-process store. Its variables ignore the partitioner (one
// process holds everything) and the staleness settings; the optimizer, the
// aggregation and the initializer are applied exactly as a server shard
// applies them. CreateVariable validates the optimizer and initializer with
// the servers' checks (InvalidArgument naming the field).
std::unique_ptr<ParameterStore> NewLocalParameterStore();

}  // namespace distval

#endif  // DISTVAL_LOCAL_PARAMETER_STORE_H_
