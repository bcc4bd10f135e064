# frozen_string_literal: true

module Flowctl
  module Component
    # Go's time.Duration string format, as `flowctl run` writes FLOWCTL_HEARTBEAT_INTERVAL
    # ("10s", "1m30s", "1.5h", "250ms", "100us"); a bare number counts as seconds.
    #
    #   Duration.parse("1m30s")  # => 90.0
    module Duration
      UNITS = { "ns" => 1e-9, "us" => 1e-6, "µs" => 1e-6, "μs" => 1e-6, "ms" => 1e-3, "s" => 1.0, "m" => 60.0,
                "h" => 3600.0 }.freeze
      PART = /(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)/.freeze
      WHOLE = /\A(?:#{PART})+\z/.freeze
      NUMBER = /\A\d+(?:\.\d+)?\z/.freeze

      module_function

      # Seconds (Float) of a Go duration; ArgumentError naming `name` for anything else,
      # and for zero or negative durations.
      def parse(value, name: "duration")
        return positive(Float(value), value, name) if value.is_a?(Numeric)

        text = value.to_s.strip
        seconds = if NUMBER.match?(text) then Float(text)
                  elsif WHOLE.match?(text) then text.scan(PART).sum { |n, unit| Float(n) * UNITS.fetch(unit) }
                  else
                    raise ArgumentError, "#{name}: #{value.inspect} is not a duration " \
                                         "(Go format such as \"10s\", \"500ms\", \"1m30s\", or seconds)"
                  end
        positive(seconds, value, name)
      end

      def positive(seconds, value, name)
        raise ArgumentError, "#{name}: #{value.inspect} must be more than zero" unless seconds.positive? && seconds.finite?

        seconds
      end
    end
  end
end
