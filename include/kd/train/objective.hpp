// kd/train/objective.hpp: the combined distillation objective.
//
// An objective is a list of named components (lm, kd, feature, attention, load_balance, router_z,
// z_loss, ...) each with a weight schedule, plus a temperature schedule. Per step it hands out the
// weights (pass weight * loss_scale as each loss's grad_scale, so gradients arrive already weighted),
// then combines the component values into the total, checking each for NaN/Inf by name and step.
// The LM component is always present: it is added by the constructor and cannot be removed, so the
// LM loss is reported on every logged line even when its weight is 0.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <kd/policy/curriculum.hpp>
#include <kd/core/status.hpp>
#include <kd/train/finite_guard.hpp>

namespace kd {

struct objective_term {
  std::string name;
  double value = 0.0;   // the component's own (unweighted) loss
  double weight = 0.0;  // its weight at this step
  [[nodiscard]] double weighted() const noexcept { return value * weight; }
};

struct objective_evaluation {
  std::int64_t step = 0;
  double total = 0.0;
  double temperature = 1.0;
  std::vector<objective_term> terms;

  [[nodiscard]] const objective_term* find(std::string_view name) const {
    for (const auto& t : terms)
      if (t.name == name) return &t;
    return nullptr;
  }
};

class objective {
 public:
  explicit objective(any_schedule lm_weight = fixed(1.0)) { components_.push_back({"lm", std::move(lm_weight)}); }

  // Adds a component (or replaces the schedule of one with that name).
  objective& add(std::string name, any_schedule weight) {
    for (auto& c : components_)
      if (c.name == name) {
        c.weight = std::move(weight);
        return *this;
      }
    components_.push_back({std::move(name), std::move(weight)});
    return *this;
  }

  template <Curve C>
  objective& temperature(schedule<C> s) {
    // (void): nvcc reads the assignment's status& result as a discarded [[nodiscard]] value.
    static_cast<void>(temperature_valid_ = validate_temperature(s));
    temperature_ = s;
    return *this;
  }

  status validate() const {
    KD_TRY(temperature_valid_);
    for (const auto& c : components_)
      if (const auto& v = c.weight.validate(); !v.ok())
        return {v.code(), "component '" + c.name + "': " + v.message()};
    return {};
  }

  [[nodiscard]] double weight(std::string_view name, std::int64_t step) const {
    for (const auto& c : components_)
      if (c.name == name) return c.weight(step);
    return 0.0;
  }
  [[nodiscard]] double temperature_at(std::int64_t step) const { return temperature_(step); }
  [[nodiscard]] bool has(std::string_view name) const {
    return std::any_of(components_.begin(), components_.end(), [&](const auto& c) { return c.name == name; });
  }

  // True while any weight or the temperature is still changing (early stopping waits for this).
  [[nodiscard]] bool ramping(std::int64_t step) const {
    if (temperature_.ramping(step)) return true;
    return std::any_of(components_.begin(), components_.end(), [&](const auto& c) { return c.weight.ramping(step); });
  }

  [[nodiscard]] std::vector<std::string> names() const {
    std::vector<std::string> n;
    for (const auto& c : components_) n.push_back(c.name);
    return n;
  }

  // Combines component values into the weighted total. Every component must be given exactly once;
  // a NaN/Inf value fails with its name and the step.
  status combine(std::int64_t step, const std::vector<std::pair<std::string, double>>& values,
                 objective_evaluation& out) const {
    KD_TRY(validate());
    for (std::size_t i = 0; i < values.size(); ++i)
      for (std::size_t j = 0; j < i; ++j)
        if (values[j].first == values[i].first)
          return {errc::invalid_argument, "objective component '" + values[i].first + "' is given twice at step " +
                                              std::to_string(step)};
    objective_evaluation ev;
    ev.step = step;
    ev.temperature = temperature_(step);
    for (const auto& c : components_) {
      const auto it = std::find_if(values.begin(), values.end(), [&](const auto& v) { return v.first == c.name; });
      if (it == values.end())
        return {errc::invalid_argument, "no value for objective component '" + c.name + "' at step " +
                                            std::to_string(step)};
      KD_TRY(check_finite_loss(c.name, step, it->second));
      ev.terms.push_back({c.name, it->second, c.weight(step)});
      ev.total += ev.terms.back().weighted();
    }
    for (const auto& v : values)
      if (!has(v.first))
        return {errc::invalid_argument, "value for unknown objective component '" + v.first + "'"};
    KD_TRY(check_finite_loss("total", step, ev.total));
    out = std::move(ev);
    return {};
  }

 private:
  struct component {
    std::string name;
    any_schedule weight;
  };
  std::vector<component> components_;
  any_schedule temperature_ = fixed(1.0);
  status temperature_valid_;
};

// Records an evaluation's total and every component into a metrics logger.
template <class Logger>
void record(Logger& logger, const objective_evaluation& ev) {
  logger.record("total", ev.total);
  for (const auto& t : ev.terms) logger.record(t.name, t.value);
}

}  // namespace kd
