// ProgressBar: the per-epoch progress display of Model::Fit (Keras style).
//
//   Epoch 2/5
//   117/156 [=====================>........] - ETA 1s - loss: 0.4811 - accuracy: 0.8312 - 24113
//   ex/s 156/156 [==============================] - 2.1s 13ms/step - loss: 0.4711 - ... - val_loss:
//   0.5012
//
// Interactive (a terminal): the bar is redrawn in place with \r at most every
// 100 ms. Otherwise: a line at each quarter of the epoch, then the final
// line. Internal to the model library.
//
// Thread-safety: one thread.
#ifndef DISTVAL_WORKER_PROGRESS_BAR_H_
#define DISTVAL_WORKER_PROGRESS_BAR_H_

#include <chrono>
#include <cstdint>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace distval::internal {

// (name, value) pairs in display order.
using ProgressValues = std::vector<std::pair<std::string, double>>;

class ProgressBar {
 public:
  // `show_bar` false: only the final line (Verbosity::kOneLinePerEpoch).
  ProgressBar(std::ostream& out, bool interactive, bool show_bar, int epoch, int epochs,
              int64_t steps);

  // After step `done` (1-based) of the epoch.
  void Update(int64_t done, const ProgressValues& values, double examples_per_s);
  // The epoch's final line (values include validation).
  void Finish(int64_t done, const ProgressValues& values, double examples_per_s);

  // "1.2s", "3m04s", "1h02m".
  static std::string FormatDuration(double seconds);

 private:
  std::string Bar(int64_t done) const;
  static std::string FormatValues(const ProgressValues& values);

  std::ostream& out_;
  bool interactive_;
  bool show_bar_;
  int64_t steps_;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_{};
  size_t last_width_ = 0;
  int64_t next_quarter_ = 1;
};

}  // namespace distval::internal

#endif  // DISTVAL_WORKER_PROGRESS_BAR_H_
