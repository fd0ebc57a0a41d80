// `limoe report DIR`: the table and pictures of an experiment (scripts/experiment): for every arm the mean and
// standard deviation of each metric over its seeds, the paired difference of every arm against the baseline
// with a 95% interval, routing per MoE block, and each run's exact command. Reads DIR/ARM/seedS/eval.json (and
// command.txt), with DIR/protocol.txt giving the arms' order, the baseline and the title; writes DIR/report.md,
// report.json, accuracy.svg and (with MoE arms) routing.svg, and prints report.md.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <limoe/data/tokenizer.hpp>
#include <limoe/eval/summary.hpp>
#include <limoe/io/file.hpp>
#include <nlohmann/json.hpp>

#include "cli.hpp"

// A namespace of its own, so that the build may compile the commands together (tools/CMakeLists.txt).
namespace limoe_cmd_report {
namespace {
using namespace limoe;
namespace fs = std::filesystem;

// The metrics of eval.json a report shows, in its columns' order: key, column title, format.
struct Metric {
  std::string key, title;
  enum Kind { Fraction, Percent, Loss, Count, Seconds } kind;
};
std::vector<Metric>& metrics() {
  static std::vector<Metric> m{
      {"zero_shot_top1", "zero-shot", Metric::Fraction},
      {"compositional_zero_shot", "compositional", Metric::Fraction},
      {"linear_probe_10shot", "10-shot probe", Metric::Fraction},
      {"recall_at_1_i2t_unique", "R@1 img->txt", Metric::Fraction},
      {"recall_at_1_t2i_unique", "R@1 txt->img", Metric::Fraction},
      {"heldout_contrastive_loss", "held-out loss", Metric::Loss},
      {"drop_rate_img", "image drops", Metric::Percent},
      {"drop_rate_txt", "text drops", Metric::Percent},
      {"text_effective_experts", "text eff. experts", Metric::Count},
      {"experts_specialised_share", "specialised experts", Metric::Percent},
      {"train_seconds", "train s", Metric::Seconds},
  };
  return m;
}
// The metrics of the paired-difference table and the accuracy picture.
const std::vector<std::string> kPairedKeys{"zero_shot_top1", "compositional_zero_shot", "recall_at_1_i2t_unique",
                                           "heldout_contrastive_loss", "drop_rate_txt", "text_effective_experts"};
const std::vector<std::string> kPictureKeys{"zero_shot_top1", "compositional_zero_shot"};

std::string fmt(double v, Metric::Kind k) {
  char b[64];
  switch (k) {
    case Metric::Percent: std::snprintf(b, sizeof b, "%.1f%%", 100 * v); break;
    case Metric::Loss: std::snprintf(b, sizeof b, "%.3f", v); break;
    case Metric::Count: std::snprintf(b, sizeof b, "%.2f", v); break;
    case Metric::Seconds: std::snprintf(b, sizeof b, "%.0f", v); break;
    default: std::snprintf(b, sizeof b, "%.4f", v);
  }
  return b;
}
// The shot count N of an eval.json key "linear_probe_<N>shot" (limoe eval --shots N); 0 for any other key.
int probe_shots(const std::string& key) {
  const std::string head = "linear_probe_", tail = "shot";
  if (key.size() <= head.size() + tail.size() || key.rfind(head, 0) != 0 ||
      key.compare(key.size() - tail.size(), tail.size(), tail) != 0)
    return 0;
  const std::string n = key.substr(head.size(), key.size() - head.size() - tail.size());
  if (n.empty() || n.size() > 6 || n.find_first_not_of("0123456789") != std::string::npos || n[0] == '0') return 0;
  return std::stoi(n);
}

const Metric& metric(const std::string& key) {
  for (const auto& m : metrics())
    if (key == m.key) return m;
  fail("report: no metric ", key);
}

struct Run {
  int seed = 0;
  nlohmann::json eval;
  std::string command;
};

// The parts of an eval.json a report reads, checked where it is read: a value of another type than `limoe eval`
// writes is an error naming the file and the key (a hand-edited or foreign file), never a JSON library's message.
// null is a number that was not defined (eval writes a NaN as null): read as absent.
void check_eval(const nlohmann::json& e, const fs::path& file) {
  auto bad = [&](const std::string& key, const char* want) {
    fail("report: ", file.string(), ": \"", key, "\" must be ", want);
  };
  auto number = [&](const nlohmann::json& j, const std::string& where, const char* key) {
    if (j.contains(key) && !j[key].is_number() && !j[key].is_null()) bad(where + key, "a number");
  };
  auto numbers = [&](const nlohmann::json& j, const std::string& where, const char* key) {
    if (!j.contains(key)) return;
    if (!j[key].is_array()) bad(where + key, "an array of numbers");
    for (const auto& v : j[key])
      if (!v.is_number() && !v.is_null()) bad(where + key, "an array of numbers");
  };
  for (const auto& m : metrics()) number(e, "", m.key.c_str());
  for (auto it = e.begin(); it != e.end(); ++it)
    if (probe_shots(it.key()) > 0) number(e, "", it.key().c_str());
  if (!e.contains("routing")) return;
  if (!e["routing"].is_array()) bad("routing", "an array of blocks (limoe eval's routing)");
  for (std::size_t i = 0; i < e["routing"].size(); ++i) {
    const auto& b = e["routing"][i];
    const std::string at = "routing[" + std::to_string(i) + "].";
    if (!b.is_object()) bad(at.substr(0, at.size() - 1), "an object");
    for (const char* k : {"block", "experts", "experts_image_specialised", "experts_text_specialised"})
      if (b.contains(k) && !b[k].is_number_integer() && !b[k].is_null()) bad(at + k, "an integer");
    numbers(b, at, "image_share");
    for (const char* m : {"img", "txt"}) {
      if (!b.contains(m)) continue;
      if (!b[m].is_object()) bad(at + m, "an object");
      number(b[m], at + m + ".", "drop_rate");
      number(b[m], at + m + ".", "effective_experts");
      numbers(b[m], at + m + ".", "routed");
    }
  }
}
struct Arm {
  std::string name;
  std::vector<Run> runs;
  std::map<int, double> values(const std::string& key) const {
    std::map<int, double> v;
    for (const auto& r : runs)
      if (r.eval.contains(key) && r.eval[key].is_number()) v[r.seed] = r.eval[key].get<double>();
    return v;
  }
  std::vector<double> list(const std::string& key) const {
    std::vector<double> v;
    for (const auto& [s, x] : values(key)) v.push_back(x);
    return v;
  }
};

std::string read_text(const fs::path& p) {
  const std::vector<std::uint8_t> bytes = io::read_file(p.string());  // a folder or a device: named
  return std::string(bytes.begin(), bytes.end());
}

// DIR/protocol.txt: "title ...", "baseline NAME", "arm NAME ..." lines (scripts/experiment); others ignored.
struct Protocol {
  std::string title, baseline;
  std::vector<std::string> arms;
};
Protocol read_protocol(const fs::path& dir) {
  Protocol p;
  std::ifstream f(dir / "protocol.txt");
  for (std::string line; std::getline(f, line);) {
    std::istringstream is(line);
    std::string word, name;
    is >> word;
    if (word == "title") std::getline(is >> std::ws, p.title);
    else if (word == "baseline") is >> p.baseline;
    else if (word == "arm" && (is >> name)) p.arms.push_back(name);
  }
  return p;
}

std::vector<Arm> read_arms(const fs::path& dir, const Protocol& proto) {
  std::vector<std::string> names = proto.arms;
  if (names.empty()) {
    for (const auto& e : fs::directory_iterator(dir))
      if (e.is_directory()) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
  }
  std::vector<Arm> arms;
  for (const auto& n : names) {
    Arm a;
    a.name = n;
    if (fs::is_directory(dir / n))
      for (const auto& e : fs::directory_iterator(dir / n)) {
        const std::string s = e.path().filename().string();
        if (!e.is_directory() || s.rfind("seed", 0) != 0 || !fs::exists(e.path() / "eval.json")) continue;
        Run r;
        char* end = nullptr;
        r.seed = static_cast<int>(std::strtol(s.c_str() + 4, &end, 10));
        LIMOE_CHECK(end && *end == '\0' && s.size() > 4, "report: ", e.path().string(), " is not seedN");
        const std::string text = read_text(e.path() / "eval.json");
        r.eval = nlohmann::json::parse(text, nullptr, false);
        LIMOE_CHECK(!r.eval.is_discarded(), "report: ", (e.path() / "eval.json").string(), " is not valid JSON",
                    text.find_first_not_of(" \t\r\n") == std::string::npos ? " (it is empty)" : "");
        LIMOE_CHECK(r.eval.is_object(), "report: ", (e.path() / "eval.json").string(), " is not a JSON object");
        check_eval(r.eval, e.path() / "eval.json");
        if (fs::exists(e.path() / "command.txt")) r.command = read_text(e.path() / "command.txt");
        while (!r.command.empty() && r.command.back() == '\n') r.command.pop_back();
        a.runs.push_back(std::move(r));
      }
    std::sort(a.runs.begin(), a.runs.end(), [](const Run& x, const Run& y) { return x.seed < y.seed; });
    arms.push_back(std::move(a));
  }
  LIMOE_CHECK(!arms.empty(), "report: no arms under ", dir.string(), " (expected ARM/seedN/eval.json)");
  LIMOE_CHECK(std::any_of(arms.begin(), arms.end(), [](const Arm& a) { return !a.runs.empty(); }), "report: no runs under ",
              dir.string(), ": none of the arms ", proto.arms.empty() ? "there" : "protocol.txt lists",
              " has an ARM/seedN/eval.json");
  return arms;
}

// The probes of every shot count the runs report (eval --shots N writes linear_probe_<N>shot), as columns after
// the 10-shot one, fewest shots first.
void add_probe_metrics(const std::vector<Arm>& arms) {
  std::set<int> shots;
  for (const auto& a : arms)
    for (const auto& r : a.runs)
      for (auto it = r.eval.begin(); it != r.eval.end(); ++it)
        if (const int n = probe_shots(it.key()); n > 0 && n != 10) shots.insert(n);
  auto& m = metrics();
  for (const int n : shots) {
    const std::string key = "linear_probe_" + std::to_string(n) + "shot";
    if (std::any_of(m.begin(), m.end(), [&](const Metric& x) { return key == x.key; })) continue;
    // After the probes of fewer shots (the 10-shot one counts as 10).
    auto at = std::find_if(m.begin(), m.end(), [](const Metric& x) { return probe_shots(x.key) > 0; });
    while (at != m.end() && probe_shots(at->key) > 0 && probe_shots(at->key) < n) ++at;
    m.insert(at, Metric{key, std::to_string(n) + "-shot probe", Metric::Fraction});
  }
}

// Per MoE block of an arm, the mean over seeds of the routing figures, and every expert's image share.
struct BlockRouting {
  int block = 0, experts = 0;
  double drop_img = 0, drop_txt = 0, txt_eff = 0, spec_img = 0, spec_txt = 0;
  // The same counted on modality-balanced shares: expert e's share of image traffic over its share of image plus
  // its share of text traffic (p_img(e) / (p_img(e) + p_txt(e))), so the base rate (text is a minority) does not
  // count as specialisation.
  double bal_img = 0, bal_txt = 0;
  std::vector<double> shares;  // every seed's experts
  int seeds = 0;
};
std::vector<BlockRouting> routing_of(const Arm& a) {
  std::vector<BlockRouting> out;
  for (const auto& r : a.runs) {
    if (!r.eval.contains("routing")) continue;
    const auto& blocks = r.eval["routing"];
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      if (out.size() <= i) out.emplace_back();
      auto& b = out[i];
      const auto& j = blocks[i];
      // check_eval has seen the types; a part left out reads as 0 (or nothing).
      static const nlohmann::json none = nlohmann::json::object();
      const auto& img = j.contains("img") ? j["img"] : none;
      const auto& txt = j.contains("txt") ? j["txt"] : none;
      auto num = [](const nlohmann::json& o, const char* k) { return o.contains(k) && o[k].is_number() ? o[k].get<double>() : 0.0; };
      auto list = [](const nlohmann::json& o, const char* k) {
        std::vector<double> v;
        if (o.contains(k))
          for (const auto& x : o[k]) v.push_back(x.is_number() ? x.get<double>() : 0.0);
        return v;
      };
      b.block = static_cast<int>(num(j, "block"));
      b.experts = static_cast<int>(num(j, "experts"));
      b.drop_img += num(img, "drop_rate");
      b.drop_txt += num(txt, "drop_rate");
      b.txt_eff += num(txt, "effective_experts");
      b.spec_img += num(j, "experts_image_specialised");
      b.spec_txt += num(j, "experts_text_specialised");
      if (j.contains("image_share"))
        for (const auto& s : j["image_share"])
          if (s.is_number()) b.shares.push_back(s.get<double>());  // null: an expert with no tokens
      if (img.contains("routed") && txt.contains("routed")) {
        const auto ri = list(img, "routed"), rt = list(txt, "routed");
        double si = 0, st = 0;
        for (double v : ri) si += v;
        for (double v : rt) st += v;
        for (std::size_t e = 0; e < ri.size() && e < rt.size() && si > 0 && st > 0; ++e) {
          const double pi = ri[e] / si, pt = rt[e] / st;
          if (pi + pt <= 0) continue;
          b.bal_img += pi / (pi + pt) > 0.9;
          b.bal_txt += pt / (pi + pt) > 0.9;
        }
      }
      ++b.seeds;
    }
  }
  for (auto& b : out) {
    const double n = std::max(1, b.seeds);
    b.drop_img /= n, b.drop_txt /= n, b.txt_eff /= n, b.spec_img /= n, b.spec_txt /= n, b.bal_img /= n, b.bal_txt /= n;
  }
  return out;
}

// ---- pictures --------------------------------------------------------------------------------------------

const char* kColours[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"};

// Text for an SVG's XML: the markup characters escaped, and the control characters XML 1.0 does not allow even
// escaped (all below U+0020 but tab, line feed and carriage return) written as U+FFFD.
std::string esc(const std::string& s) {
  std::string o;
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 && c != '\t' && c != '\n' && c != '\r') o += "\xEF\xBF\xBD";
    else o += c == '<' ? "&lt;" : c == '>' ? "&gt;" : c == '&' ? "&amp;" : c == '"' ? "&quot;" : std::string(1, c);
  }
  return o;
}

// One panel per metric: each arm's seeds as dots, the mean as a bar across them, +- one sd as a whisker.
std::string accuracy_svg(const std::vector<Arm>& arms, const std::vector<std::string>& keys, const std::string& title) {
  const int pw = std::max(320, 90 * static_cast<int>(arms.size()) + 80), ph = 260;
  std::ostringstream s;
  s << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << pw * static_cast<int>(keys.size()) << "\" height=\""
    << ph + 40 << "\" font-family=\"sans-serif\" font-size=\"11\">\n"
    << "<text x=\"10\" y=\"16\" font-size=\"13\">" << esc(title) << "</text>\n";
  for (std::size_t k = 0; k < keys.size(); ++k) {
    double lo = 1e300, hi = -1e300;
    for (const auto& a : arms) {
      const auto v = a.list(keys[k]);
      if (v.empty()) continue;
      const MeanSd m = mean_sd(v);
      lo = std::min({lo, m.mean - m.sd, *std::min_element(v.begin(), v.end())});
      hi = std::max({hi, m.mean + m.sd, *std::max_element(v.begin(), v.end())});
    }
    if (lo > hi) continue;
    const double pad = std::max(0.005, 0.15 * (hi - lo));
    lo -= pad, hi += pad;
    const int x0 = static_cast<int>(k) * pw + 60, y0 = 40, h = ph - 60;
    auto Y = [&](double v) { return y0 + h - (v - lo) / (hi - lo) * h; };
    s << "<text x=\"" << x0 << "\" y=\"34\" font-size=\"12\">" << metric(keys[k]).title << " (each seed; bar: mean, "
      << "whisker: +-1 sd)</text>\n"
      << "<line x1=\"" << x0 << "\" y1=\"" << y0 << "\" x2=\"" << x0 << "\" y2=\"" << y0 + h << "\" stroke=\"#000\"/>\n";
    for (int t = 0; t <= 4; ++t) {
      const double v = lo + (hi - lo) * t / 4;
      s << "<text x=\"" << x0 - 4 << "\" y=\"" << Y(v) + 4 << "\" text-anchor=\"end\">" << fmt(v, Metric::Fraction)
        << "</text><line x1=\"" << x0 << "\" y1=\"" << Y(v) << "\" x2=\"" << x0 + pw - 80 << "\" y2=\"" << Y(v)
        << "\" stroke=\"#eee\"/>\n";
    }
    for (std::size_t i = 0; i < arms.size(); ++i) {
      const auto v = arms[i].list(keys[k]);
      const double cx = x0 + 45 + 90.0 * static_cast<double>(i);
      const char* col = kColours[i % 8];
      s << "<text x=\"" << cx << "\" y=\"" << y0 + h + 14 << "\" text-anchor=\"middle\">" << esc(arms[i].name) << "</text>\n";
      if (v.empty()) continue;
      const MeanSd m = mean_sd(v);
      s << "<line x1=\"" << cx << "\" y1=\"" << Y(m.mean - m.sd) << "\" x2=\"" << cx << "\" y2=\"" << Y(m.mean + m.sd)
        << "\" stroke=\"" << col << "\" stroke-width=\"2\"/>\n"
        << "<line x1=\"" << cx - 18 << "\" y1=\"" << Y(m.mean) << "\" x2=\"" << cx + 18 << "\" y2=\"" << Y(m.mean)
        << "\" stroke=\"" << col << "\" stroke-width=\"3\"/>\n";
      for (std::size_t j = 0; j < v.size(); ++j)
        s << "<circle cx=\"" << cx - 12 + 24.0 * static_cast<double>(j) / std::max<std::size_t>(1, v.size() - 1)
          << "\" cy=\"" << Y(v[j]) << "\" r=\"3\" fill=\"" << col << "\" fill-opacity=\"0.6\"/>\n";
    }
  }
  s << "</svg>\n";
  return s.str();
}

// Left: per arm and MoE block, image and text drop rates (mean over seeds). Right: every expert's image share
// (all seeds), with the 10% / 90% lines of modality specialisation.
// routing[i]: routing_of(arms[i]).
std::string routing_svg(const std::vector<Arm>& arms, const std::vector<std::vector<BlockRouting>>& routing,
                        const std::string& title) {
  std::vector<std::pair<const Arm*, const std::vector<BlockRouting>*>> rows;
  std::size_t columns = 0;
  for (std::size_t i = 0; i < arms.size(); ++i) {
    if (routing[i].empty()) continue;
    columns += routing[i].size();
    rows.emplace_back(&arms[i], &routing[i]);
  }
  const int cw = 46, h = 200, y0 = 40, x0 = 60;
  const int pw = x0 + cw * static_cast<int>(columns) + 40 + 20 * static_cast<int>(rows.size());
  std::ostringstream s;
  s << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << 2 * pw << "\" height=\"" << h + 90
    << "\" font-family=\"sans-serif\" font-size=\"11\">\n"
    << "<text x=\"10\" y=\"16\" font-size=\"13\">" << esc(title) << "</text>\n"
    << "<text x=\"" << x0 << "\" y=\"34\" font-size=\"12\">drop rate per MoE block (blue: image, red: text)</text>\n"
    << "<text x=\"" << pw + x0 << "\" y=\"34\" font-size=\"12\">experts' image share (every seed; lines at 0.1, 0.9)</text>\n";
  double top = 0.05;
  for (const auto& [a, r] : rows)
    for (const auto& b : *r) top = std::max({top, b.drop_img, b.drop_txt});
  for (int panel = 0; panel < 2; ++panel) {
    const int px = panel * pw + x0;
    const double ymax = panel == 0 ? top * 1.1 : 1.0;
    auto Y = [&](double v) { return y0 + h - v / ymax * h; };
    s << "<line x1=\"" << px << "\" y1=\"" << y0 << "\" x2=\"" << px << "\" y2=\"" << y0 + h << "\" stroke=\"#000\"/>\n";
    for (int t = 0; t <= 4; ++t) {
      const double v = ymax * t / 4;
      s << "<text x=\"" << px - 4 << "\" y=\"" << Y(v) + 4 << "\" text-anchor=\"end\">"
        << (panel == 0 ? fmt(v, Metric::Percent) : fmt(v, Metric::Count)) << "</text>\n";
    }
    if (panel == 1)
      for (double v : {0.1, 0.9})
        s << "<line x1=\"" << px << "\" y1=\"" << Y(v) << "\" x2=\"" << panel * pw + pw - 20 << "\" y2=\"" << Y(v)
          << "\" stroke=\"#aaa\" stroke-dasharray=\"4,3\"/>\n";
    int c = 0, gap = 0;
    for (const auto& [a, r] : rows) {
      const int first = px + 10 + cw * c + 20 * gap;
      for (const auto& b : *r) {
        const int cx = px + 10 + cw * c + 20 * gap;
        if (panel == 0) {
          s << "<rect x=\"" << cx << "\" y=\"" << Y(b.drop_img) << "\" width=\"16\" height=\"" << Y(0) - Y(b.drop_img)
            << "\" fill=\"#1f77b4\"/><rect x=\"" << cx + 18 << "\" y=\"" << Y(b.drop_txt) << "\" width=\"16\" height=\""
            << Y(0) - Y(b.drop_txt) << "\" fill=\"#d62728\"/>\n";
        } else {
          for (std::size_t e = 0; e < b.shares.size(); ++e)
            s << "<circle cx=\"" << cx + 6 + (e * 7919 % 23) << "\" cy=\"" << Y(b.shares[e])
              << "\" r=\"2.5\" fill=\"#444\" fill-opacity=\"0.5\"/>\n";
        }
        s << "<text x=\"" << cx + 17 << "\" y=\"" << y0 + h + 14 << "\" text-anchor=\"middle\">b" << b.block << "</text>\n";
        ++c;
      }
      s << "<text x=\"" << (first + px + 10 + cw * c + 20 * gap) / 2 << "\" y=\"" << y0 + h + 30
        << "\" text-anchor=\"middle\">" << esc(a->name) << "</text>\n";
      ++gap;
    }
  }
  s << "</svg>\n";
  return s.str();
}

int run(const std::vector<std::string>& argv) {
  cli::Args args(argv, {"baseline", "title"}, {}, "report");
  LIMOE_CHECK(args.positional().size() == 1, "expected one experiment folder (scripts/experiment's --out), got ",
              args.positional().size(), " arguments");
  const fs::path dir = args.positional()[0];
  LIMOE_CHECK(fs::is_directory(dir), "report: ", dir.string(), " is not a folder");
  const Protocol proto = read_protocol(dir);
  const std::vector<Arm> arms = read_arms(dir, proto);
  add_probe_metrics(arms);
  const std::string title = args.str("title", proto.title.empty() ? dir.filename().string() : proto.title);
  // What report.json records must be UTF-8 (JSON holds nothing else): checked before anything is written.
  LIMOE_CHECK(data::valid_utf8(title), "report: the title must be UTF-8 text (", args.has("title") ? "--title" :
              proto.title.empty() ? "the folder's name gives it" : "protocol.txt's title line gives it", ")");
  for (const auto& a : arms) {
    LIMOE_CHECK(data::valid_utf8(a.name), "report: the arm folder names must be UTF-8 (report.json records them); "
                "one under ", dir.string(), " is not");
    for (const auto& r : a.runs)
      LIMOE_CHECK(data::valid_utf8(r.command), "report: ", (dir / a.name / ("seed" + std::to_string(r.seed)) /
                  "command.txt").string(), " is not UTF-8 text (report.json records it)");
  }
  const std::string base_name = args.str("baseline", proto.baseline.empty() ? arms.front().name : proto.baseline);
  const auto base_it = std::find_if(arms.begin(), arms.end(), [&](const Arm& a) { return a.name == base_name; });
  LIMOE_CHECK(base_it != arms.end(), "report: the baseline arm \"", base_name, "\" is not among the arms");

  // Columns: the metrics any run reports.
  std::vector<const Metric*> cols;
  for (const auto& m : metrics())
    for (const auto& a : arms)
      if (!a.list(m.key).empty()) {
        cols.push_back(&m);
        break;
      }
  std::ostringstream md;
  nlohmann::json js = {{"title", title}, {"baseline", base_name}, {"arms", nlohmann::json::array()}};
  std::size_t runs = 0;
  double seconds = 0;
  std::set<int> seeds;
  for (const auto& a : arms)
    for (const auto& r : a.runs) {
      ++runs;
      if (r.eval.contains("train_seconds") && r.eval["train_seconds"].is_number())
        seconds += r.eval["train_seconds"].get<double>();
      seeds.insert(r.seed);
    }
  md << "# " << title << "\n\n" << runs << " runs, seeds";
  for (int s : seeds) md << " " << s;
  char buf[128];
  std::snprintf(buf, sizeof buf, "; training time %.0f s (%.2f h, the sum of the runs' train_seconds)", seconds,
                seconds / 3600);
  md << buf << ".\n\n## Mean +- standard deviation over seeds\n\n| arm | runs |";
  for (const auto* m : cols) md << " " << m->title << " |";
  md << "\n|---|---|";
  for (std::size_t i = 0; i < cols.size(); ++i) md << "---|";
  md << "\n";
  for (const auto& a : arms) {
    nlohmann::json ja = {{"arm", a.name}, {"runs", a.runs.size()}};
    md << "| " << a.name << " | " << a.runs.size() << " |";
    for (const auto* m : cols) {
      const auto v = a.list(m->key);
      const MeanSd s = mean_sd(v);
      if (v.empty()) md << " - |";
      else md << " " << fmt(s.mean, m->kind) << (v.size() > 1 ? " +- " + fmt(s.sd, m->kind) : "") << " |";
      if (!v.empty()) ja[m->key] = {{"mean", s.mean}, {"sd", s.sd}, {"n", s.n}, {"values", v}};
    }
    md << "\n";
    js["arms"].push_back(ja);
  }

  md << "\n## Paired differences against " << base_name
     << " (mean [95% interval] over the seeds both ran; ** the interval excludes 0)\n\n| arm |";
  std::vector<const Metric*> pcols;
  for (const auto& k : kPairedKeys)
    if (std::find_if(cols.begin(), cols.end(), [&](const Metric* m) { return k == m->key; }) != cols.end())
      pcols.push_back(&metric(k));
  for (const auto* m : pcols) md << " " << m->title << " |";
  md << "\n|---|";
  for (std::size_t i = 0; i < pcols.size(); ++i) md << "---|";
  md << "\n";
  nlohmann::json jd = nlohmann::json::array();
  for (const auto& a : arms) {
    if (a.name == base_name) continue;
    md << "| " << a.name << " |";
    nlohmann::json row = {{"arm", a.name}};
    for (const auto* m : pcols) {
      const PairedDiff d = paired_difference(a.values(m->key), base_it->values(m->key));
      if (d.n == 0) {
        md << " - |";
        continue;
      }
      const Metric::Kind k = m->kind == Metric::Seconds ? Metric::Loss : m->kind;
      md << " " << (d.mean >= 0 ? "+" : "") << fmt(d.mean, k);
      if (d.n >= 2) md << " [" << fmt(d.lo, k) << ", " << fmt(d.hi, k) << "]" << (d.excludes_zero() ? " **" : "");
      else md << " (1 pair)";
      md << " |";
      row[m->key] = {{"mean", d.mean}, {"lo", d.lo}, {"hi", d.hi}, {"n", d.n}};
    }
    md << "\n";
    jd.push_back(row);
  }
  js["paired_differences"] = jd;
  std::vector<std::vector<BlockRouting>> routing;  // per arm, computed once
  for (const auto& a : arms) routing.push_back(routing_of(a));
  js["routing"] = nlohmann::json::object();
  for (std::size_t i = 0; i < arms.size(); ++i)
    for (const auto& b : routing[i])
      js["routing"][arms[i].name].push_back({{"block", b.block}, {"experts", b.experts}, {"drop_img", b.drop_img},
                                       {"drop_txt", b.drop_txt}, {"text_effective_experts", b.txt_eff},
                                       {"image_specialised", b.spec_img}, {"text_specialised", b.spec_txt},
                                       {"balanced_image_specialised", b.bal_img},
                                       {"balanced_text_specialised", b.bal_txt}});

  bool any_routing = false;
  for (std::size_t i = 0; i < arms.size(); ++i) {
    const Arm& a = arms[i];
    const auto& r = routing[i];
    if (r.empty()) continue;
    if (!any_routing)
      md << "\n## Routing per MoE block (evaluation pairs routed as in training; mean over seeds)\n\n"
         << "| arm | block | image drops | text drops | text eff. experts | image- / text-specialised experts (of E) | "
            "the same on balanced shares |\n"
         << "|---|---|---|---|---|---|---|\n";
    any_routing = true;
    for (const auto& b : r) {
      std::snprintf(buf, sizeof buf, "| %s | %d | %.1f%% | %.1f%% | %.2f | %.1f / %.1f (of %d) | %.1f / %.1f |\n",
                    a.name.c_str(), b.block, 100 * b.drop_img, 100 * b.drop_txt, b.txt_eff, b.spec_img, b.spec_txt,
                    b.experts, b.bal_img, b.bal_txt);
      md << buf;
    }
  }
  md << "\n## Commands\n\n";
  for (const auto& a : arms)
    if (!a.runs.empty()) md << "- " << a.name << ": `" << a.runs.front().command << "` (seeds as listed)\n";
  md << "\nPictures: accuracy.svg" << (any_routing ? ", routing.svg" : "") << ".\n";

  std::vector<std::string> pic;
  for (const auto& k : kPictureKeys)
    if (std::find_if(cols.begin(), cols.end(), [&](const Metric* m) { return k == m->key; }) != cols.end()) pic.push_back(k);
  // The report's files together or not at all (a folder in the way of one leaves the others as they were).
  const std::string acc = accuracy_svg(arms, pic, title), rsvg = any_routing ? routing_svg(arms, routing, title) : "",
                    json = js.dump(1) + "\n", text = md.str();
  std::vector<std::pair<std::string, std::string_view>> files{{(dir / "accuracy.svg").string(), acc}};
  if (any_routing) files.emplace_back((dir / "routing.svg").string(), rsvg);
  files.emplace_back((dir / "report.json").string(), json);
  files.emplace_back((dir / "report.md").string(), text);
  io::write_files_atomic(files);
  std::cout << md.str();
  return 0;
}

const cli::Register reg({"report", "the table and pictures of an experiment's runs (scripts/experiment)",
                         "usage: limoe report DIR [--baseline ARM] [--title T]\n\n"
                         "  DIR              an experiment folder: DIR/ARM/seedN/eval.json (limoe eval's output) and\n"
                         "                   command.txt; DIR/protocol.txt (optional) gives the arms' order, the\n"
                         "                   baseline and the title\n"
                         "  --baseline ARM   the arm the paired differences are taken against (default: the\n"
                         "                   protocol's, else the first arm)\n"
                         "  --title T        the report's title\n\n"
                         "Writes DIR/report.md (printed too), report.json, accuracy.svg and, when arms have MoE\n"
                         "blocks, routing.svg: per arm the mean +- sd of each metric over seeds, the paired difference\n"
                         "of each arm against the baseline with its 95% Student-t interval, the drop rates, text's\n"
                         "effective number of experts and the modality-specialised experts per MoE block.\n",
                         run});
}  // namespace
}  // namespace limoe_cmd_report
