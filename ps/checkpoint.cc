#include "checkpoint.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>

#include "distval/crc32c.h"

namespace distval::ps {
namespace {

using nlohmann::json;

constexpr char kMagic[8] = {'D', 'V', 'C', 'K', 'P', 'T', '\0', '\1'};
constexpr size_t kPreambleBytes = 24;
constexpr size_t kAlign = 64;

std::string ErrnoText() { return std::strerror(errno); }

std::string CheckpointName(int64_t clock) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "ckpt-%012lld", static_cast<long long>(clock));
  return buf;
}
std::string DataName(int shard, int num_shards) {
  return "shard-" + std::to_string(shard) + "-of-" + std::to_string(num_shards) + ".dvckpt";
}
std::string ManifestName(int shard, int num_shards) {
  return "manifest-" + std::to_string(shard) + "-of-" + std::to_string(num_shards) + ".json";
}

// "ckpt-000000000012" -> 12.
std::optional<int64_t> ParseCheckpointName(const std::string& name) {
  if (name.size() != 17 || name.rfind("ckpt-", 0) != 0) return std::nullopt;
  int64_t v = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return std::nullopt;
    v = v * 10 + (name[i] - '0');
  }
  return v;
}

// "manifest-3-of-4.json" -> (3, 4).
std::optional<std::pair<int, int>> ParseManifestName(const std::string& name) {
  int shard = -1, n = -1, used = 0;
  if (std::sscanf(name.c_str(), "manifest-%d-of-%d.json%n", &shard, &n, &used) != 2 ||
      static_cast<size_t>(used) != name.size())
    return std::nullopt;
  return std::make_pair(shard, n);
}

StatusOr<std::vector<std::string>> ListDir(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) {
    if (errno == ENOENT) return NotFoundError("checkpoint directory " + dir + " does not exist");
    return InternalError("cannot read directory " + dir + ": " + ErrnoText());
  }
  std::vector<std::string> names;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(n);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

Status MakeDir(const std::string& path) {
  if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST)
    return InternalError("cannot create directory " + path + ": " + ErrnoText());
  return OkStatus();
}

Status SyncDir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return InternalError("cannot open directory " + dir + ": " + ErrnoText());
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) return InternalError("fsync of directory " + dir + ": " + std::strerror(err));
  return OkStatus();
}

// A file written as "<path>.tmp" and renamed over `path` by Commit().
class AtomicFile {
 public:
  AtomicFile() = default;
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile() {
    if (fd_ >= 0) {
      ::close(fd_);
      ::unlink(tmp_.c_str());
    }
  }
  Status Open(const std::string& dir, const std::string& name) {
    dir_ = dir;
    path_ = dir + "/" + name;
    tmp_ = path_ + ".tmp";
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) return InternalError("cannot create " + tmp_ + ": " + ErrnoText());
    return OkStatus();
  }
  Status Write(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      ssize_t w = ::write(fd_, p, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        return InternalError("write to " + tmp_ + ": " + ErrnoText());
      }
      p += w;
      n -= static_cast<size_t>(w);
      written_ += static_cast<uint64_t>(w);
    }
    return OkStatus();
  }
  Status PadTo(uint64_t offset) {
    static const char zeros[kAlign] = {};
    while (written_ < offset) {
      DV_RETURN_IF_ERROR(Write(zeros, std::min<uint64_t>(kAlign, offset - written_)));
    }
    return OkStatus();
  }
  // fsync, close, rename, fsync the directory.
  Status Commit() {
    if (::fsync(fd_) != 0) return InternalError("fsync of " + tmp_ + ": " + ErrnoText());
    int rc = ::close(fd_);
    fd_ = -1;
    if (rc != 0) {
      ::unlink(tmp_.c_str());
      return InternalError("close of " + tmp_ + ": " + ErrnoText());
    }
    if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
      Status s = InternalError("rename " + tmp_ + " -> " + path_ + ": " + ErrnoText());
      ::unlink(tmp_.c_str());
      return s;
    }
    return SyncDir(dir_);
  }
  uint64_t written() const { return written_; }

 private:
  std::string dir_, path_, tmp_;
  int fd_ = -1;
  uint64_t written_ = 0;
};

std::string ToHex(std::span<const std::byte> bytes) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  s.reserve(bytes.size() * 2);
  for (std::byte b : bytes) {
    s.push_back(digits[static_cast<unsigned>(b) >> 4]);
    s.push_back(digits[static_cast<unsigned>(b) & 15]);
  }
  return s;
}

std::optional<std::vector<std::byte>> FromHex(const std::string& s) {
  if (s.size() % 2 != 0) return std::nullopt;
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  std::vector<std::byte> out(s.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) {
    int hi = nibble(s[2 * i]), lo = nibble(s[2 * i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out[i] = static_cast<std::byte>(hi * 16 + lo);
  }
  return out;
}

uint64_t AlignUp(uint64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

// The tensors of one variable, in file order: params, then the slots.
struct TensorEntry {
  std::string name;
  const float* data = nullptr;
  int64_t elements = 0;
};

std::vector<TensorEntry> Entries(const Tensor& params, const Optimizer& opt) {
  std::vector<TensorEntry> out;
  out.push_back({"params", params.data_as<float>(), params.num_elements()});
  for (const auto& [name, t] : opt.Slots())
    out.push_back({"slot:" + name, t->data_as<float>(), t->num_elements()});
  return out;
}

StatusOr<std::vector<std::byte>> ReadFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return NotFoundError(path + " not found");
    return InternalError("cannot open " + path + ": " + ErrnoText());
  }
  std::vector<std::byte> data;
  std::byte buf[1 << 16];
  for (;;) {
    ssize_t r = ::read(fd, buf, sizeof(buf));
    if (r < 0) {
      if (errno == EINTR) continue;
      Status s = InternalError("read of " + path + ": " + ErrnoText());
      ::close(fd);
      return s;
    }
    if (r == 0) break;
    data.insert(data.end(), buf, buf + r);
  }
  ::close(fd);
  return data;
}

// Reads a JSON field, naming the file and field on error.
template <typename T>
StatusOr<T> Field(const json& j, const char* field, const std::string& file,
                  const std::string& where = "") {
  if (!j.is_object() || !j.contains(field))
    return InvalidArgumentError(file + ": field " + where + field + " is missing");
  try {
    return j.at(field).get<T>();
  } catch (const std::exception&) {
    return InvalidArgumentError(file + ": field " + where + field + " has the wrong type");
  }
}

}  // namespace

StatusOr<std::string> WriteCheckpoint(const std::string& root, const CheckpointShardInfo& info,
                                      const VariableStore& store) {
  if (root.empty()) return InvalidArgumentError("checkpoint directory is empty");
  if (info.num_shards < 1 || info.shard_index < 0 || info.shard_index >= info.num_shards)
    return InvalidArgumentError("checkpoint: shard " + std::to_string(info.shard_index) + " of " +
                                std::to_string(info.num_shards));
  if (info.clock < 0) return InvalidArgumentError("checkpoint: negative clock");
  DV_RETURN_IF_ERROR(MakeDir(root));
  const std::string dir = root + "/" + CheckpointName(info.clock);
  const bool new_dir = !Exists(dir);
  DV_RETURN_IF_ERROR(MakeDir(dir));
  if (new_dir) DV_RETURN_IF_ERROR(SyncDir(root));
  const std::string manifest_name = ManifestName(info.shard_index, info.num_shards);
  const std::string data_name = DataName(info.shard_index, info.num_shards);
  // Rewriting a checkpoint at the same clock: make it incomplete first.
  if (Exists(dir + "/" + manifest_name)) {
    if (::unlink((dir + "/" + manifest_name).c_str()) != 0)
      return InternalError("cannot remove " + dir + "/" + manifest_name + ": " + ErrnoText());
    DV_RETURN_IF_ERROR(SyncDir(dir));
  }

  // Pass 1: the header (offsets and checksums of every tensor).
  json header;
  header["format"] = "distval-checkpoint";
  header["version"] = kCheckpointFormatVersion;
  header["shard_index"] = info.shard_index;
  header["num_shards"] = info.num_shards;
  header["clock"] = info.clock;
  header["staleness"] = info.staleness;
  header["worker_clocks"] = info.worker_clocks;
  json vars = json::array();
  uint64_t offset = 0;  // relative to the data start, fixed up below
  std::vector<Variable*> all = store.All();
  for (Variable* v : all) {
    json jv;
    jv["name"] = v->name();
    protocol::Request req;
    protocol::CreateVariable cv;
    cv.spec = v->spec();
    cv.rows = v->rows();
    std::vector<size_t> frames;
    if (auto* iv = std::get_if<protocol::InitValues>(&cv.spec.initializer.kind)) {
      iv->values.frame = 1;
      frames.push_back(iv->values.num_bytes());
    }
    req.body = cv;
    jv["spec"] = ToHex(protocol::EncodeRequest(req));
    jv["spec_frames"] = frames;
    jv["rows"] = {v->rows().begin, v->rows().end};
    json tensors = json::array();
    DV_RETURN_IF_ERROR(VariableStore::VisitState(
        *v, [&](const Tensor& params, const Optimizer& opt, uint64_t version) -> Status {
          jv["version"] = version;
          jv["step"] = opt.step();
          jv["learning_rate"] = opt.learning_rate();
          for (const TensorEntry& e : Entries(params, opt)) {
            const size_t bytes = static_cast<size_t>(e.elements) * sizeof(float);
            tensors.push_back({{"name", e.name},
                               {"offset", offset},
                               {"elements", e.elements},
                               {"crc32c", Crc32c(e.data, bytes)}});
            offset = AlignUp(offset + bytes);
          }
          return OkStatus();
        }));
    jv["tensors"] = std::move(tensors);
    vars.push_back(std::move(jv));
  }
  // Data starts after the preamble and the header, 64-byte aligned. The
  // header's offsets depend on its own length: fix them up to a fixed point.
  uint64_t data_start = 0;
  std::string text;
  for (int round = 0; round < 4; ++round) {
    json h = header;
    json vs = vars;
    for (auto& jv : vs)
      for (auto& t : jv["tensors"]) t["offset"] = t["offset"].get<uint64_t>() + data_start;
    h["variables"] = std::move(vs);
    try {
      text = h.dump();
    } catch (const json::exception& e) {  // e.g. a name that is not UTF-8
      return InvalidArgumentError(std::string("checkpoint header: ") + e.what());
    }
    const uint64_t need = AlignUp(kPreambleBytes + text.size());
    if (need == data_start) break;
    data_start = need;
  }
  if (AlignUp(kPreambleBytes + text.size()) != data_start)
    return InternalError("checkpoint header layout did not settle");

  // Pass 2: write the data file.
  AtomicFile file;
  DV_RETURN_IF_ERROR(file.Open(dir, data_name));
  unsigned char pre[kPreambleBytes] = {};
  std::memcpy(pre, kMagic, 8);
  const uint32_t version = kCheckpointFormatVersion;
  const uint32_t hlen = static_cast<uint32_t>(text.size());
  const uint32_t hcrc = Crc32c(text.data(), text.size());
  std::memcpy(pre + 8, &version, 4);
  std::memcpy(pre + 12, &hlen, 4);
  std::memcpy(pre + 16, &hcrc, 4);
  uint32_t file_crc = Crc32c(pre, sizeof(pre));
  DV_RETURN_IF_ERROR(file.Write(pre, sizeof(pre)));
  file_crc = Crc32cExtend(file_crc, text.data(), text.size());
  DV_RETURN_IF_ERROR(file.Write(text.data(), text.size()));
  static const unsigned char zeros[kAlign] = {};
  auto pad = [&](uint64_t to) -> Status {
    while (file.written() < to) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(kAlign, to - file.written()));
      file_crc = Crc32cExtend(file_crc, zeros, n);
      DV_RETURN_IF_ERROR(file.Write(zeros, n));
    }
    return OkStatus();
  };
  DV_RETURN_IF_ERROR(pad(data_start));
  size_t vi = 0;
  for (Variable* v : all) {
    const json& jts = vars[vi++]["tensors"];
    DV_RETURN_IF_ERROR(VariableStore::VisitState(
        *v, [&](const Tensor& params, const Optimizer& opt, uint64_t) -> Status {
          std::vector<TensorEntry> entries = Entries(params, opt);
          for (size_t t = 0; t < entries.size(); ++t) {
            const size_t bytes = static_cast<size_t>(entries[t].elements) * sizeof(float);
            DV_RETURN_IF_ERROR(pad(data_start + jts[t]["offset"].get<uint64_t>()));
            if (Crc32c(entries[t].data, bytes) != jts[t]["crc32c"].get<uint32_t>())
              return InternalError("variable '" + v->name() +
                                   "' changed while its checkpoint was written");
            file_crc = Crc32cExtend(file_crc, entries[t].data, bytes);
            DV_RETURN_IF_ERROR(file.Write(entries[t].data, bytes));
          }
          return OkStatus();
        }));
  }
  const uint64_t total = file.written();
  DV_RETURN_IF_ERROR(file.Commit());

  // The manifest: this shard's part is complete.
  json m;
  m["format"] = "distval-checkpoint-manifest";
  m["version"] = kCheckpointFormatVersion;
  m["shard_index"] = info.shard_index;
  m["num_shards"] = info.num_shards;
  m["clock"] = info.clock;
  m["file"] = data_name;
  m["bytes"] = total;
  m["crc32c"] = file_crc;
  std::string mtext;
  try {
    mtext = m.dump(1) + "\n";
  } catch (const json::exception& e) {
    return InvalidArgumentError(std::string("checkpoint manifest: ") + e.what());
  }
  AtomicFile mf;
  DV_RETURN_IF_ERROR(mf.Open(dir, manifest_name));
  DV_RETURN_IF_ERROR(mf.Write(mtext.data(), mtext.size()));
  DV_RETURN_IF_ERROR(mf.Commit());
  return dir;
}

Status PruneCheckpoints(const std::string& root, int shard_index, int num_shards, int keep) {
  if (keep < 1) return InvalidArgumentError("--keep must be >= 1, got " + std::to_string(keep));
  DV_ASSIGN_OR_RETURN(std::vector<std::string> names, ListDir(root));
  std::vector<std::string> all, mine;  // ascending clock (names sort by clock)
  for (const std::string& n : names) {
    if (!ParseCheckpointName(n)) continue;
    all.push_back(n);
    if (Exists(root + "/" + n + "/" + ManifestName(shard_index, num_shards))) mine.push_back(n);
  }
  if (mine.size() <= static_cast<size_t>(keep)) return OkStatus();
  // Everything older than the oldest kept one goes, interrupted writes too.
  const std::string oldest_kept = mine[mine.size() - static_cast<size_t>(keep)];
  for (size_t i = 0; i < all.size() && all[i] < oldest_kept; ++i) {
    const std::string dir = root + "/" + all[i];
    // The manifest first: from then on the checkpoint is incomplete.
    for (const std::string& f :
         {ManifestName(shard_index, num_shards), DataName(shard_index, num_shards),
          DataName(shard_index, num_shards) + ".tmp",
          ManifestName(shard_index, num_shards) + ".tmp"}) {
      if (::unlink((dir + "/" + f).c_str()) != 0 && errno != ENOENT)
        return InternalError("cannot remove " + dir + "/" + f + ": " + ErrnoText());
    }
    (void)::rmdir(dir.c_str());  // fails while other shards' files remain
  }
  return SyncDir(root);
}

StatusOr<std::string> FindLatestCheckpoint(const std::string& root, int num_shards) {
  DV_ASSIGN_OR_RETURN(std::vector<std::string> names, ListDir(root));
  for (auto it = names.rbegin(); it != names.rend(); ++it) {
    if (!ParseCheckpointName(*it)) continue;
    const std::string dir = root + "/" + *it;
    bool complete = true;
    for (int s = 0; s < num_shards && complete; ++s)
      complete = Exists(dir + "/" + ManifestName(s, num_shards));
    if (complete) return dir;
  }
  return NotFoundError("no complete checkpoint of " + std::to_string(num_shards) +
                       " shard(s) under " + root);
}

StatusOr<RestoredCheckpoint> RestoreCheckpoint(const std::string& dir_in, int shard_index,
                                               int num_shards, VariableStore& store) {
  std::string dir = dir_in;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  if (store.size() != 0) return FailedPreconditionError("restore into a non-empty store");
  // 1. The manifests: the same number of shards, none missing.
  DV_ASSIGN_OR_RETURN(std::vector<std::string> names, ListDir(dir));
  for (const std::string& n : names) {
    auto parsed = ParseManifestName(n);
    if (parsed && parsed->second != num_shards)
      return FailedPreconditionError(dir + "/" + n + ": field num_shards is " +
                                     std::to_string(parsed->second) + ", this job has " +
                                     std::to_string(num_shards) + " shard(s)");
  }
  for (int s = 0; s < num_shards; ++s) {
    const std::string path = dir + "/" + ManifestName(s, num_shards);
    if (!Exists(path))
      return NotFoundError("checkpoint " + dir + " is missing shard " + std::to_string(s) + ": " +
                           path + " not found");
  }
  const std::string mpath = dir + "/" + ManifestName(shard_index, num_shards);
  DV_ASSIGN_OR_RETURN(std::vector<std::byte> mbytes, ReadFile(mpath));
  json m =
      json::parse(reinterpret_cast<const char*>(mbytes.data()),
                  reinterpret_cast<const char*>(mbytes.data()) + mbytes.size(), nullptr, false);
  if (m.is_discarded()) return DataLossError(mpath + ": not valid JSON");
  DV_ASSIGN_OR_RETURN(std::string format, Field<std::string>(m, "format", mpath));
  DV_ASSIGN_OR_RETURN(uint32_t mversion, Field<uint32_t>(m, "version", mpath));
  if (format != "distval-checkpoint-manifest" || mversion != kCheckpointFormatVersion)
    return InvalidArgumentError(
        mpath + ": field format/version is " + format + " v" + std::to_string(mversion) +
        ", expected distval-checkpoint-manifest v" + std::to_string(kCheckpointFormatVersion));
  DV_ASSIGN_OR_RETURN(int mshard, Field<int>(m, "shard_index", mpath));
  DV_ASSIGN_OR_RETURN(int mshards, Field<int>(m, "num_shards", mpath));
  if (mshard != shard_index || mshards != num_shards)
    return FailedPreconditionError(mpath + ": field shard_index/num_shards is " +
                                   std::to_string(mshard) + "/" + std::to_string(mshards) +
                                   ", expected " + std::to_string(shard_index) + "/" +
                                   std::to_string(num_shards));
  DV_ASSIGN_OR_RETURN(std::string file, Field<std::string>(m, "file", mpath));
  DV_ASSIGN_OR_RETURN(uint64_t mbytes_expected, Field<uint64_t>(m, "bytes", mpath));
  DV_ASSIGN_OR_RETURN(uint32_t mcrc, Field<uint32_t>(m, "crc32c", mpath));
  DV_ASSIGN_OR_RETURN(int64_t mclock, Field<int64_t>(m, "clock", mpath));
  if (file != DataName(shard_index, num_shards))
    return InvalidArgumentError(mpath + ": field file is '" + file + "', expected '" +
                                DataName(shard_index, num_shards) + "'");

  // 2. The data file: size, preamble, header checksum.
  const std::string path = dir + "/" + file;
  auto read = ReadFile(path);
  if (!read.ok()) {
    if (read.status().code() == StatusCode::kNotFound)
      return NotFoundError("checkpoint " + dir + " is missing shard " +
                           std::to_string(shard_index) + "'s data: " + path + " not found");
    return read.status();
  }
  const std::vector<std::byte>& data = *read;
  if (data.size() != mbytes_expected)
    return DataLossError(path + ": truncated or extended: " + std::to_string(data.size()) +
                         " bytes, field bytes of " + mpath + " says " +
                         std::to_string(mbytes_expected));
  if (data.size() < kPreambleBytes || std::memcmp(data.data(), kMagic, 8) != 0)
    return DataLossError(path + ": field magic: not a distval checkpoint file");
  uint32_t fversion, hlen, hcrc;
  std::memcpy(&fversion, data.data() + 8, 4);
  std::memcpy(&hlen, data.data() + 12, 4);
  std::memcpy(&hcrc, data.data() + 16, 4);
  if (fversion != kCheckpointFormatVersion)
    return InvalidArgumentError(path + ": field version is " + std::to_string(fversion) +
                                ", this server reads version " +
                                std::to_string(kCheckpointFormatVersion));
  if (kPreambleBytes + static_cast<uint64_t>(hlen) > data.size())
    return DataLossError(path + ": field header_length " + std::to_string(hlen) +
                         " runs past the end of the file");
  const char* htext = reinterpret_cast<const char*>(data.data()) + kPreambleBytes;
  if (Crc32c(htext, hlen) != hcrc)
    return DataLossError(path + ": checksum mismatch in field header (crc32c)");
  json h = json::parse(htext, htext + hlen, nullptr, false);
  if (h.is_discarded()) return InvalidArgumentError(path + ": field header is not valid JSON");

  RestoredCheckpoint out;
  DV_ASSIGN_OR_RETURN(out.info.shard_index, Field<int>(h, "shard_index", path));
  DV_ASSIGN_OR_RETURN(out.info.num_shards, Field<int>(h, "num_shards", path));
  DV_ASSIGN_OR_RETURN(out.info.clock, Field<int64_t>(h, "clock", path));
  DV_ASSIGN_OR_RETURN(out.info.staleness, Field<int32_t>(h, "staleness", path));
  DV_ASSIGN_OR_RETURN(out.info.worker_clocks,
                      Field<std::vector<int64_t>>(h, "worker_clocks", path));
  if (out.info.shard_index != shard_index || out.info.num_shards != num_shards)
    return FailedPreconditionError(path + ": field shard_index/num_shards is " +
                                   std::to_string(out.info.shard_index) + "/" +
                                   std::to_string(out.info.num_shards) + ", expected " +
                                   std::to_string(shard_index) + "/" + std::to_string(num_shards));
  if (out.info.clock != mclock)
    return InvalidArgumentError(path + ": field clock is " + std::to_string(out.info.clock) +
                                ", the manifest says " + std::to_string(mclock));
  if (!h.contains("variables") || !h["variables"].is_array())
    return InvalidArgumentError(path + ": field variables is missing");

  // 3. Every tensor's bounds and checksum, before anything is loaded.
  struct Loaded {
    protocol::VariableSpec spec;
    protocol::RowRange rows;
    uint64_t version;
    int64_t step;
    double lr;
    std::vector<std::pair<std::string, const float*>> tensors;
    std::vector<int64_t> elements;
  };
  std::vector<Loaded> loaded;
  for (const json& jv : h["variables"]) {
    DV_ASSIGN_OR_RETURN(std::string name, Field<std::string>(jv, "name", path));
    const std::string where = "variables['" + name + "'].";
    Loaded l;
    DV_ASSIGN_OR_RETURN(std::string spec_hex, Field<std::string>(jv, "spec", path, where));
    auto spec_bytes = FromHex(spec_hex);
    if (!spec_bytes) return InvalidArgumentError(path + ": field " + where + "spec is not hex");
    // A values initializer names payload frame 1: give the decoder its size.
    DV_ASSIGN_OR_RETURN(std::vector<size_t> frame_sizes,
                        Field<std::vector<size_t>>(jv, "spec_frames", path, where));
    auto decoded = protocol::DecodeRequest(*spec_bytes, frame_sizes);
    if (!decoded.ok())
      return InvalidArgumentError(path + ": field " + where +
                                  "spec: " + decoded.status().message());
    const auto* cv = std::get_if<protocol::CreateVariable>(&decoded->body);
    if (cv == nullptr)
      return InvalidArgumentError(path + ": field " + where + "spec is not a variable spec");
    l.spec = cv->spec;
    l.rows = cv->rows;
    if (l.spec.name != name)
      return InvalidArgumentError(path + ": field " + where + "spec names '" + l.spec.name + "'");
    DV_ASSIGN_OR_RETURN(std::vector<int64_t> rows,
                        Field<std::vector<int64_t>>(jv, "rows", path, where));
    if (rows.size() != 2 || rows[0] != l.rows.begin || rows[1] != l.rows.end)
      return InvalidArgumentError(path + ": field " + where +
                                  "rows does not match the rows of its spec");
    DV_ASSIGN_OR_RETURN(l.version, Field<uint64_t>(jv, "version", path, where));
    DV_ASSIGN_OR_RETURN(l.step, Field<int64_t>(jv, "step", path, where));
    DV_ASSIGN_OR_RETURN(l.lr, Field<double>(jv, "learning_rate", path, where));
    if (!jv.contains("tensors") || !jv["tensors"].is_array())
      return InvalidArgumentError(path + ": field " + where + "tensors is missing");
    for (const json& jt : jv["tensors"]) {
      DV_ASSIGN_OR_RETURN(std::string tname, Field<std::string>(jt, "name", path, where));
      const std::string twhere = where + "tensors['" + tname + "'].";
      DV_ASSIGN_OR_RETURN(uint64_t off, Field<uint64_t>(jt, "offset", path, twhere));
      DV_ASSIGN_OR_RETURN(int64_t elems, Field<int64_t>(jt, "elements", path, twhere));
      DV_ASSIGN_OR_RETURN(uint32_t crc, Field<uint32_t>(jt, "crc32c", path, twhere));
      if (elems < 0 || off % kAlign != 0 || off > data.size() ||
          static_cast<uint64_t>(elems) > (data.size() - off) / sizeof(float))
        return DataLossError(path + ": field " + twhere + "offset/elements (" +
                             std::to_string(off) + ", " + std::to_string(elems) +
                             ") runs past the end of the file (" + std::to_string(data.size()) +
                             " bytes)");
      const float* p = reinterpret_cast<const float*>(data.data() + off);
      if (Crc32c(p, static_cast<size_t>(elems) * sizeof(float)) != crc)
        return DataLossError(path + ": checksum mismatch in field " + twhere + "crc32c");
      l.tensors.emplace_back(tname, p);
      l.elements.push_back(elems);
    }
    loaded.push_back(std::move(l));
  }
  // The whole file (padding included).
  if (Crc32c(data.data(), data.size()) != mcrc)
    return DataLossError(path + ": checksum mismatch against field crc32c of " + mpath);

  // 4. Create and fill the variables.
  for (Loaded& l : loaded) {
    const std::string where = path + ": variable '" + l.spec.name + "': ";
    if (l.tensors.empty() || l.tensors[0].first != "params")
      return InvalidArgumentError(where + "field tensors has no 'params' first");
    // The values initializer's frame is not stored: create from the saved
    // parameters themselves (any initializer accepts initial values).
    auto v = store.Create(l.spec, l.rows, l.tensors[0].second);
    if (!v.ok()) return InvalidArgumentError(where + "spec: " + v.status().message());
    Variable& var = **v;
    if (l.elements[0] != var.num_elements())
      return InvalidArgumentError(where + "spec mismatch: field tensors['params'].elements is " +
                                  std::to_string(l.elements[0]) + ", the spec's rows hold " +
                                  std::to_string(var.num_elements()));
    DV_RETURN_IF_ERROR(
        VariableStore::RestoreState(var, l.version, [&](Tensor& params, Optimizer& opt) -> Status {
          auto slots = opt.Slots();
          if (slots.size() + 1 != l.tensors.size())
            return InvalidArgumentError(where + "spec mismatch: the checkpoint has " +
                                        std::to_string(l.tensors.size() - 1) +
                                        " optimizer slot(s), the spec's optimizer has " +
                                        std::to_string(slots.size()));
          std::memcpy(params.data_as<float>(), l.tensors[0].second,
                      static_cast<size_t>(l.elements[0]) * sizeof(float));
          for (size_t i = 0; i < slots.size(); ++i) {
            const auto& [tname, tp] = l.tensors[i + 1];
            if (tname != "slot:" + slots[i].first ||
                l.elements[i + 1] != slots[i].second->num_elements())
              return InvalidArgumentError(where + "spec mismatch: field tensors['" + tname +
                                          "'] does not match optimizer slot '" + slots[i].first +
                                          "'");
            std::memcpy(slots[i].second->data_as<float>(), tp,
                        static_cast<size_t>(l.elements[i + 1]) * sizeof(float));
          }
          if (l.step < 0) return InvalidArgumentError(where + "field step is negative");
          opt.set_step(l.step);
          Status s = opt.SetLearningRate(l.lr);
          if (!s.ok()) return InvalidArgumentError(where + "field learning_rate: " + s.message());
          return OkStatus();
        }));
    out.variables.emplace_back(l.spec.name, l.spec.staleness);
  }
  return out;
}

}  // namespace distval::ps
