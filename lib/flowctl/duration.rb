# frozen_string_literal: true

module Flowctl
  # Durations as flowctl writes them: Go's time.ParseDuration syntax ("10s", "500ms",
  # "1m30s", "1.5h", "250us", "-1s"), and plain seconds ("2.5"). Exact: "1m30s" is 90.0.
  module Duration
    UNITS = {
      "ns" => Rational(1, 1_000_000_000), "us" => Rational(1, 1_000_000), "\u00b5s" => Rational(1, 1_000_000),
      "\u03bcs" => Rational(1, 1_000_000), "ms" => Rational(1, 1000), "s" => 1, "m" => 60, "h" => 3600
    }.freeze
    NUMBER = /(?:\d+(?:\.\d*)?|\.\d+)/.freeze
    PART = /(#{NUMBER})(ns|us|\u00b5s|\u03bcs|ms|s|m|h)/.freeze
    GO = /\A([+-]?)((?:#{PART})+)\z/.freeze
    SECONDS = /\A#{NUMBER}\z/.freeze

    module_function

    # Seconds as a Float; ArgumentError naming `name` when value is not a duration.
    #   Duration.parse("1m30s") # => 90.0
    #   Duration.parse("0")     # => 0.0 (Go's one unitless duration; plain seconds otherwise)
    def parse(value, name: "duration")
      return value.to_f if value.is_a?(Numeric)
      raise TypeError, "#{name} must be a duration String or a number of seconds (given #{value.class})" unless value.is_a?(String)

      text = value.strip
      return Rational(text).to_f if SECONDS.match?(text)

      m = GO.match(text) or raise ArgumentError, "#{name}: #{value.inspect} is not a duration " \
                                                 '(use a Go duration such as "10s", "500ms", "1m30s", or seconds)'
      total = m[2].scan(PART).sum { |number, unit| Rational(number.end_with?(".") ? number.chop : number) * UNITS.fetch(unit) }
      (m[1] == "-" ? -total : total).to_f
    end
  end
end
