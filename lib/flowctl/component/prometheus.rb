# frozen_string_literal: true

module Flowctl
  module Component
    # A Metrics snapshot in the Prometheus text exposition format 0.0.4 (what /metrics
    # serves; `promtool check metrics` accepts it). Every sample carries the label
    # component="<id>". A component's own counters are `<name>_total`, its gauges `<name>`.
    class Prometheus
      PREFIX = "flowctl_component_"
      CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

      COUNTERS = {
        "events_received" => "Events the component received.",
        "events_emitted" => "Events the component produced.",
        "events_failed" => "Events whose processing raised an error.",
        "events_dropped" => "Events received but never processed (shutdown, peer gone)."
      }.freeze

      def initialize(snapshot, started_at, component_id)
        @s = snapshot
        @started_at = started_at
        @label = %(component="#{escape(component_id.to_s)}")
        @out = +""
      end

      def text
        COUNTERS.each { |name, help| family("#{PREFIX}#{name}_total", "counter", help, @s[:counts].fetch(name)) }
        histogram
        family("#{PREFIX}in_flight", "gauge", "Events being processed now.", @s[:in_flight])
        last = @s[:last_event_at]
        family("#{PREFIX}last_event_timestamp_seconds", "gauge", "Unix time of the last event (0: none yet).",
               last || 0)
        family("#{PREFIX}start_time_seconds", "gauge", "Unix time the component started.", @started_at.to_f)
        config
        @s[:counters].each do |name, v|
          family(name.end_with?("_total") ? name : "#{name}_total", "counter", "Component counter #{name}.", v)
        end
        @s[:gauges].each { |name, v| family(name, "gauge", "Component gauge #{name}.", v) }
        @out
      end

      private

      def config
        return unless (cfg = @s[:config])

        family("#{PREFIX}config_version", "gauge", "Live configuration version applied (0: none yet).", cfg[:version])
        family("#{PREFIX}config_refused_version", "gauge", "Live configuration version refused last (0: none).",
               cfg[:refused_version] || 0)
      end

      def family(name, type, help, value)
        @out << "# HELP #{name} #{help}\n# TYPE #{name} #{type}\n#{name}{#{@label}} #{number(value)}\n"
      end

      def histogram
        name = "#{PREFIX}processing_seconds"
        @out << "# HELP #{name} Time spent in the component's method per event.\n# TYPE #{name} histogram\n"
        cumulative = 0
        Metrics::BUCKETS.each_with_index do |bound, i|
          cumulative += @s[:buckets][i]
          @out << %(#{name}_bucket{#{@label},le="#{number(bound)}"} #{cumulative}\n)
        end
        cumulative += @s[:buckets].last
        @out << %(#{name}_bucket{#{@label},le="+Inf"} #{cumulative}\n)
        @out << "#{name}_sum{#{@label}} #{number(@s[:latency_sum])}\n#{name}_count{#{@label}} #{cumulative}\n"
      end

      def number(v)
        return v.to_s if v.is_a?(Integer)

        f = v.to_f
        f == f.floor && f.abs < 1e15 ? f.to_i.to_s : f.to_s
      end

      def escape(s) = s.gsub("\\", "\\\\\\\\").gsub("\"", "\\\"").gsub("\n", "\\n")
    end
  end
end
