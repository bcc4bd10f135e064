# frozen_string_literal: true

module Flowctl
  module Component
    # The standard metrics of a component, kept without any code of the component's own:
    # events received, emitted, failed and dropped; processing latency (a histogram of the
    # time spent in the component's method); events in flight; the time of the last event.
    # Components add their own counters and gauges:
    #
    #   metrics.increment("rows_written", 10)
    #   metrics.set("queue_depth", 3)
    #
    # Read as the protocol's heartbeat map (#to_heartbeat, String => String), as numbers
    # (#to_numbers, for the seed's map<string,double>), as JSON-ready Hash (#to_h) and in the
    # Prometheus text format (#to_prometheus). Thread-safe. A stream counts its events in a
    # Tally of its own (#tally, #retire): no lock per event.
    class Metrics
      # Latency buckets in seconds: 50 µs .. 10 s.
      BUCKETS = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                 2.5, 5.0, 10.0].freeze
      STANDARD = %w[events_received events_emitted events_failed events_dropped].freeze
      NAME = /\A[a-zA-Z_][a-zA-Z0-9_]*\z/.freeze
      RESERVED = (STANDARD + %w[in_flight last_event_time latency_avg_ms latency_p50_ms latency_p99_ms
                                uptime_seconds config_version config_refused_version config_error]).freeze

      def initialize
        @lock = Mutex.new
        @counts = STANDARD.to_h { |k| [k, 0] }
        @user_counters = {}
        @user_gauges = {}
        @buckets = Array.new(BUCKETS.size + 1, 0) # the last one is +Inf
        @latency_sum = 0.0
        @in_flight = 0
        @last_event_at = nil
        @started_at = Time.now
        @config = nil # live configuration (LiveConfig): {version:, refused_version:, error:}
        @tallies = []
        # CLOCK_REALTIME - CLOCK_MONOTONIC: a tally's monotonic last event time as Unix time
        @epoch = Process.clock_gettime(Process::CLOCK_REALTIME) - Process.clock_gettime(Process::CLOCK_MONOTONIC)
      end

      # A new Tally for a stream, counted in every snapshot until #retire.
      def tally
        t = Tally.new
        @lock.synchronize { @tallies << t }
        t
      end

      # A stream ended: its counts become part of the totals.
      def retire(tally)
        @lock.synchronize do
          next unless @tallies.delete(tally)

          add_tally(tally, @counts, @buckets)
          @latency_sum += tally.latency_sum
          @in_flight += tally.in_flight
          @last_event_at = latest(@last_event_at, tally)
        end
        nil
      end

      attr_reader :started_at

      # Live configuration: the version applied (reported as "config_version" from now on;
      # a refusal reported before is over).
      def config_version=(version)
        @lock.synchronize { @config = { version: version, refused_version: nil, error: nil }.freeze }
      end

      # Live configuration: a version was refused (reported as "config_refused_version" and
      # "config_error" until a later one is applied; then they read 0 and "").
      def config_refused(version, reason)
        @lock.synchronize do
          @config = { version: @config ? @config[:version] : 0, refused_version: version, error: reason.to_s }.freeze
        end
      end

      # An event arrived (received += 1).
      def received(n = 1) = @lock.synchronize { @counts["events_received"] += n }

      def emitted(n = 1) = @lock.synchronize { @counts["events_emitted"] += n }

      def failed(n = 1) = @lock.synchronize { @counts["events_failed"] += n }

      def dropped(n = 1) = @lock.synchronize { @counts["events_dropped"] += n }

      # An event enters the component's method: received += 1, in flight += 1.
      def begin_event
        @lock.synchronize do
          @counts["events_received"] += 1
          @in_flight += 1
        end
      end

      # It left after `seconds`: in flight -= 1, latency observed, last event time set;
      # failed += 1 when it raised, emitted += the number of events it produced.
      def end_event(seconds, emitted: 0, failed: false)
        i = BUCKETS.bsearch_index { |b| b >= seconds } || BUCKETS.size
        now = Process.clock_gettime(Process::CLOCK_REALTIME) # a Float: cheaper than a Time per event
        @lock.synchronize do
          @in_flight -= 1
          @buckets[i] += 1
          @latency_sum += seconds
          @counts["events_emitted"] += emitted
          @counts["events_failed"] += 1 if failed
          @last_event_at = now
        end
      end

      # A component's own counter: increment("rows", 5).
      def increment(name, by = 1)
        key = check_name(name)
        raise TypeError, "increment #{key}: by must be a non-negative number (given #{by.inspect})" unless by.is_a?(Numeric) && by >= 0

        @lock.synchronize { @user_counters[key] = (@user_counters[key] || 0) + by }
      end

      # A component's own gauge: set("queue_depth", 3).
      def set(name, value)
        key = check_name(name)
        raise TypeError, "gauge #{key}: value must be a finite number (given #{value.inspect})" unless value.is_a?(Numeric) && value.to_f.finite?

        @lock.synchronize { @user_gauges[key] = value }
      end

      def [](name)
        key = name.to_s
        @lock.synchronize { @counts[key] || @user_counters[key] || @user_gauges[key] || (key == "in_flight" ? @in_flight : nil) }
      end

      def in_flight = @lock.synchronize { @in_flight }

      # A consistent copy of everything.
      def snapshot
        @lock.synchronize do
          counts = @counts.dup
          buckets = @buckets.dup
          snap = { counts: counts, counters: @user_counters.dup, gauges: @user_gauges.dup, buckets: buckets,
                   latency_sum: @latency_sum, in_flight: @in_flight, last_event_at: @last_event_at, config: @config }
          @tallies.each do |t|
            add_tally(t, counts, buckets)
            snap[:latency_sum] += t.latency_sum
            snap[:in_flight] += t.in_flight
            snap[:last_event_at] = latest(snap[:last_event_at], t)
          end
          snap
        end
      end

      # Numbers by name: the standard counters, in_flight, latency (ms), last_event_time (Unix
      # seconds, 0 before the first event), uptime, config_version (and config_refused_version)
      # with live configuration, then the component's own.
      def to_numbers(snap = snapshot)
        n = snap[:buckets].sum
        out = snap[:counts].dup
        out["in_flight"] = snap[:in_flight]
        out["latency_avg_ms"] = n.zero? ? 0.0 : (snap[:latency_sum] * 1000 / n).round(3)
        out["latency_p50_ms"] = quantile(snap[:buckets], 0.5)
        out["latency_p99_ms"] = quantile(snap[:buckets], 0.99)
        out["last_event_time"] = snap[:last_event_at] ? snap[:last_event_at].round(3) : 0
        out["uptime_seconds"] = (Time.now - @started_at).round(3)
        if (cfg = snap[:config])
          out["config_version"] = cfg[:version]
          out["config_refused_version"] = cfg[:refused_version] || 0 # 0: none (a control plane merges heartbeat keys)
        end
        out.merge(snap[:counters]).merge(snap[:gauges])
      end

      # The flowctl.v1 heartbeat / HealthCheck map: String => String (last_event_time in RFC 3339).
      def to_heartbeat
        snap = snapshot
        out = to_numbers(snap).transform_values { |v| format_number(v) }
        last = snap[:last_event_at]
        out["last_event_time"] = last ? Time.at(last).utc.strftime("%Y-%m-%dT%H:%M:%S.%3NZ") : ""
        out["config_error"] = snap[:config][:error].to_s if snap[:config]
        out
      end

      alias to_h to_numbers

      # The Prometheus text exposition format (version 0.0.4); labels: component id.
      def to_prometheus(component_id)
        Prometheus.new(snapshot, @started_at, component_id).text
      end

      private

      # under @lock
      def add_tally(tally, counts, buckets)
        counts["events_received"] += tally.received
        counts["events_emitted"] += tally.emitted
        counts["events_failed"] += tally.failed
        tally.buckets.each_with_index { |n, i| buckets[i] += n }
      end

      def latest(unix, tally)
        return unix unless tally.last_at

        t = tally.last_at + @epoch
        unix.nil? || t > unix ? t : unix
      end

      def check_name(name)
        key = name.to_s
        raise ArgumentError, "metric name #{name.inspect} must match #{NAME.source}" unless NAME.match?(key)
        raise ArgumentError, "metric name #{key} is a standard metric; choose another" if RESERVED.include?(key) || key.start_with?("flowctl_")

        key.frozen? ? key : key.dup.freeze
      end

      # Upper bound (ms) of the bucket that holds quantile q; 0 without observations.
      def quantile(buckets, q)
        total = buckets.sum
        return 0.0 if total.zero?

        rank = (q * total).ceil
        seen = 0
        buckets.each_with_index do |c, i|
          seen += c
          return (BUCKETS.fetch(i, BUCKETS.last * 2) * 1000).round(3) if seen >= rank
        end
        0.0
      end

      def format_number(v) = v.is_a?(Float) && v == v.floor && v.abs < 1e15 ? v.to_i.to_s : v.to_s
    end
  end
end
