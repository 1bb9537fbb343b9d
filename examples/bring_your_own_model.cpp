// Bring your own model: softmax (multinomial logistic) regression on
// Fashion-MNIST written with plain Eigen, using only the parameter-server
// client's raw float buffers: Pull() copies the current parameters into your
// buffers, Push() sends your gradients (and advances this worker's clock),
// clock() tells how many steps this worker has completed. No strategy, no
// layers, no distval tensors in the model code.
//
//   tools/launch --ps 2 --workers 2 -- build/examples/bring_your_own_model --steps 300
//
// The servers apply the optimizer (SGD here) and decide when a pull may be
// answered (BSP, SSP or async: whatever they run).
#include <CLI/CLI.hpp>
#include <Eigen/Core>
#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "distval/client.h"
#include "distval/cluster_spec.h"
#include "distval/dataset.h"

namespace {

using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixMap = Eigen::Map<Matrix>;
using ConstMatrixMap = Eigen::Map<const Matrix>;
using RowVector = Eigen::Matrix<float, 1, Eigen::Dynamic>;

constexpr int kFeatures = 784;
constexpr int kClasses = 10;

// probs = softmax(x * w + b), row by row (max-subtracted).
Matrix Probabilities(const Matrix& x, const ConstMatrixMap& w,
                     const Eigen::Map<const RowVector>& b) {
  Matrix logits = (x * w).rowwise() + b;
  logits = logits.colwise() - logits.rowwise().maxCoeff();
  Matrix e = logits.array().exp();
  return e.array().colwise() / e.rowwise().sum().array();
}

// The rows of `features` / `labels` at `rows`.
void Gather(const distval::Examples& ex, const std::vector<int64_t>& rows, Matrix& x,
            std::vector<int>& y) {
  x.resize(static_cast<Eigen::Index>(rows.size()), kFeatures);
  y.resize(rows.size());
  const float* f = ex.features.data_as<float>();
  for (size_t i = 0; i < rows.size(); ++i) {
    std::copy(f + rows[i] * kFeatures, f + (rows[i] + 1) * kFeatures,
              x.data() + static_cast<int64_t>(i) * kFeatures);
    y[i] = ex.labels[static_cast<size_t>(rows[i])];
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Softmax regression with your own Eigen code and distval's raw pull/push."};
  std::string ps, data_dir(distval::kDefaultFashionMnistDir);
  int worker_index = 0, num_workers = 1, steps = 300, batch = 32;
  int64_t train_limit = -1;
  double lr = 0.1;
  app.add_option("--ps", ps, "comma-separated parameter-server endpoints")->required();
  app.add_option("--worker-index", worker_index, "this worker's index");
  app.add_option("--num-workers", num_workers, "workers in the job");
  app.add_option("--steps", steps, "steps (pushes) of this worker");
  app.add_option("--batch", batch, "examples per step of this worker");
  app.add_option("--lr", lr, "SGD learning rate (applied on the servers)");
  app.add_option("--data", data_dir, "Fashion-MNIST directory");
  app.add_option("--train-limit", train_limit, "use the first N training examples");
  CLI11_PARSE(app, argc, argv);

  auto fail = [](const distval::Status& s) {
    std::fprintf(stderr, "bring_your_own_model: %s\n", s.ToString().c_str());
    return 1;
  };
  auto cluster = distval::ClusterSpec::Make(CLI::detail::split(ps, ','), num_workers);
  if (!cluster.ok()) return fail(cluster.status());
  auto train = distval::LoadFashionMnist(data_dir, distval::Split::kTrain, train_limit);
  if (!train.ok()) return fail(train.status());
  auto test = distval::LoadFashionMnist(data_dir, distval::Split::kTest);
  if (!test.ok()) return fail(test.status());

  // ---- Connect and create the two variables (every worker does the same;
  // creation is idempotent).
  distval::ClientOptions options;
  options.ps_endpoints = cluster->ps_endpoints();
  options.worker_index = worker_index;
  options.num_workers = num_workers;
  auto client = distval::Client::Connect(options);
  if (!client.ok()) return fail(client.status());
  distval::VariableOptions vo;
  vo.initializer.kind = distval::protocol::InitZeros{};
  vo.optimizer.kind = distval::protocol::OptimizerKind::kSgd;
  vo.optimizer.learning_rate = lr;
  for (auto [name, shape] : {std::pair{"w", distval::Shape{kFeatures, kClasses}},
                             std::pair{"b", distval::Shape{kClasses}}}) {
    distval::Status s = (*client)->CreateVariable(name, distval::DType::kF32, shape, vo);
    if (!s.ok()) return fail(s);
  }

  // ---- Your buffers: parameters and gradients, allocated once.
  std::vector<float> w(kFeatures * kClasses), b(kClasses);
  std::vector<float> grad_w(w.size()), grad_b(b.size());
  ConstMatrixMap W(w.data(), kFeatures, kClasses);
  Eigen::Map<const RowVector> B(b.data(), kClasses);

  // This worker's examples: every num_workers-th one, shuffled.
  std::vector<int64_t> mine;
  for (int64_t i = worker_index; i < train->size(); i += num_workers) mine.push_back(i);
  std::mt19937 rng(static_cast<uint32_t>(1234 + worker_index));
  std::shuffle(mine.begin(), mine.end(), rng);

  Matrix x;
  std::vector<int> y;
  std::vector<int64_t> rows(static_cast<size_t>(batch));
  size_t cursor = 0;
  while ((*client)->clock() < steps) {
    // Pull: one copy from the received frames into w and b.
    distval::Status s = (*client)->Pull({{"w", w}, {"b", b}}).Wait();
    if (!s.ok()) return fail(s);

    for (int i = 0; i < batch; ++i) {
      if (cursor == mine.size()) cursor = 0;
      rows[static_cast<size_t>(i)] = mine[cursor++];
    }
    Gather(*train, rows, x, y);
    // d(mean cross-entropy)/d(logits) = (probs - one_hot) / batch.
    Matrix d = Probabilities(x, W, B);
    for (int i = 0; i < batch; ++i) d(i, y[static_cast<size_t>(i)]) -= 1.0f;
    d /= static_cast<float>(batch);
    MatrixMap(grad_w.data(), kFeatures, kClasses).noalias() = x.transpose() * d;
    Eigen::Map<RowVector>(grad_b.data(), kClasses) = d.colwise().sum();

    // Push (zero-copy from grad_w / grad_b) and advance the clock.
    s = (*client)->Push({{"w", grad_w}, {"b", grad_b}}, /*advance_clock=*/true).Wait();
    if (!s.ok()) return fail(s);
    if ((*client)->clock() % 100 == 0)
      std::printf("worker %d: step %lld\n", worker_index,
                  static_cast<long long>((*client)->clock()));
  }

  if (worker_index == 0) {
    distval::Status s = (*client)->Pull({{"w", w}, {"b", b}}).Wait();
    if (!s.ok()) return fail(s);
    std::vector<int64_t> all(static_cast<size_t>(test->size()));
    std::iota(all.begin(), all.end(), 0);
    Gather(*test, all, x, y);
    Matrix p = Probabilities(x, W, B);
    int64_t correct = 0;
    for (Eigen::Index i = 0; i < p.rows(); ++i) {
      Eigen::Index best;
      p.row(i).maxCoeff(&best);
      correct += best == y[static_cast<size_t>(i)] ? 1 : 0;
    }
    std::printf("test accuracy %.4f after %lld steps of worker 0\n",
                static_cast<double>(correct) / static_cast<double>(p.rows()),
                static_cast<long long>((*client)->clock()));
  }
  return 0;
}
