# frozen_string_literal: true

module Flowctl
  module ControlPlane
    class Registry
      # How much the control plane takes in before it refuses (RESOURCE_EXHAUSTED or
      # INVALID_ARGUMENT): a flood of registrations with unique ids, oversized registrations
      # and metrics that only ever grow (metrics merge, keys are never removed) all stop at
      # these bounds, so memory stays bounded (about max_bytes plus ~1.4 KB per component).
      #
      # max_components: distinct service ids (RESOURCE_EXHAUSTED for one more; re-registering a
      #   known id is always accepted).
      # max_registration_bytes: the strings of one registration together (ids, names, event
      #   types, endpoint, metadata keys and values): INVALID_ARGUMENT beyond it.
      # max_metrics: metric keys per component (RESOURCE_EXHAUSTED for a heartbeat adding more).
      # max_metric_bytes: one metric's key plus value (INVALID_ARGUMENT).
      # max_bytes: all the strings the registry holds, with their objects (RESOURCE_EXHAUSTED).
      Limits = Struct.new(:max_components, :max_registration_bytes, :max_metrics, :max_metric_bytes, :max_bytes,
                          keyword_init: true) do
        def self.default
          new(max_components: 100_000, max_registration_bytes: 64 * 1024, max_metrics: 256, max_metric_bytes: 4096,
              max_bytes: 256 * 1024 * 1024)
        end

        def self.build(given)
          limits = default
          (given || {}).each do |key, value|
            raise ArgumentError, "unknown limit #{key.inspect} (limits: #{members.join(', ')})" unless members.include?(key.to_sym)
            raise ArgumentError, "limit #{key} must be a positive Integer (given #{value.inspect})" unless value.is_a?(Integer) && value.positive?

            limits[key.to_sym] = value
          end
          limits.freeze
        end
      end

      # The components, keyed by service id, and every rule that changes them: the two
      # protocols' handlers (V1Service, SeedService), the janitor and persistence go through
      # these methods only. Thread-safe: one Mutex guards the table; nothing slow runs under it.
      #
      # Changes are counted (#version, for a display that redraws only on change) and, once
      # #persist_refresh is set (Persistence), noted as dirty (#take_dirty): :full for a
      # registration, :beat for a status change (heartbeat or janitor), :gone for an
      # unregistration. A heartbeat that changes only metrics and time is noted when the
      # component's last noted change is older than persist_refresh (nanoseconds): the stored
      # last heartbeat stays within that of the truth without a write per heartbeat.
      #
      # Native heartbeats (#native_beats, asked for by a server through Registry#native_unary):
      # entries registered or beaten through flowctl.v1 (native: true) are also published in a
      # Native::BeatTable (Entry#native), from which the server's acceptor answers the flowctl.v1
      # heartbeats that change nothing but metrics and time, within the limits, without Ruby
      # (ext/flowctl/beat_table.c says which); the seed's components stay Ruby's alone until a
      # v1 heartbeat comes for them. What the table took in is folded into the entries before
      # anything reads or changes them (#fold_all, #fold_one); a method that changes a published
      # entry takes it out of the table first and publishes it again after (#changing), or holds
      # it for a heartbeat (#holding), so the table's heartbeats and this store's changes stay in
      # one order, and its limits (metrics, bytes, when persistence is due) stay this store's.
      class Store
        HEALTHY = "HEALTHY"
        UNHEALTHY = "UNHEALTHY"
        STARTING = "STARTING"
        OBJECT = 40 # bytes of a Ruby object slot

        attr_reader :ttl, :limits, :persist_refresh

        # clock: nil (the real time) or anything with #call returning a Time or Float seconds.
        def initialize(ttl:, clock:, limits:)
          @ttl = ttl
          @clock = clock
          @limits = limits
          @lock = Mutex.new
          @entries = {}
          @dirty = {}
          @bytes = 0
          @version = 0
          @beats = nil # the Native::BeatTable, once asked for
        end

        # Counts every change, native heartbeats included.
        def version = @beats ? @version + @beats.answered : @version

        def persist_refresh=(nanoseconds)
          @lock.synchronize do
            @persist_refresh = nanoseconds
            sync_limits if @beats
          end
        end

        # call-seq: store.native_beats(codes) -> Native::BeatTable or nil
        #
        # The table a server answers heartbeats from (made on the first call; components are
        # published as they register or beat through flowctl.v1); nil with a clock of the
        # caller's (the table's time is the real one). codes: stored status => flowctl.v1
        # HealthStatus number, for the statuses a heartbeat may repeat natively.
        def native_beats(codes)
          return nil unless @clock.nil?

          @lock.synchronize do
            unless @beats
              @beat_codes = codes
              @beats = Native::BeatTable.new(@limits.max_metrics, @limits.max_metric_bytes)
              sync_limits
            end
            @beats
          end
        end

        # Integer nanoseconds since the epoch (as exact as upstream's timestamps, no allocation).
        def now
          return Process.clock_gettime(Process::CLOCK_REALTIME, :nanosecond) if @clock.nil?

          t = @clock.call
          t.is_a?(Time) ? t.to_i * 1_000_000_000 + t.nsec : (t * 1e9).to_i
        end

        # Registers or overwrites a component. fields: kind, protocol, endpoint, metadata and
        # the ComponentInfo fields. reset: true (flowctl.v1, as upstream) overwrites status
        # (HEALTHY), metrics (emptied), registered_at and last_heartbeat; reset: false (the
        # seed) keeps registered_at, status and metrics of a known id, a new one is STARTING.
        # Raises ResourceExhausted past the limits; returns true when the id was known.
        # native: publish it in the native table (flowctl.v1's registrations).
        def register(id, reset:, native: false, **fields)
          size = Store.registration_bytes(id, fields)
          check_registration_size(size)
          t = now
          @lock.synchronize do
            changing(id, publish: native) { register_locked(id, reset, t, size, fields) }
          end
        end

        # register's change, under the lock.
        def register_locked(id, reset, t, size, fields)
          old = @entries[id]
          check_room(size - (old ? old_bytes(old) : 0), old)
          entry = Entry.new(id: id, registered_at: t, last_heartbeat: t, status: reset ? HEALTHY : STARTING, **fields)
          if old && !reset
            entry.registered_at = old.registered_at
            entry.status = old.status
            entry.metrics = old.metrics
            entry.heartbeats = old.heartbeats
            entry.reported_at = old.reported_at
          end
          @bytes += size + metric_bytes(entry.metrics) - (old ? old_bytes(old) + metric_bytes(old.metrics) : 0)
          @entries[id] = entry
          entry.saved_at = t
          touch(id, :full)
          !old.nil?
        end
        private :register_locked

        # A heartbeat: status nil keeps the status, else stores it; metrics merge key by key.
        # kind: a seed heartbeat's kind, which must match (a component registered as
        # :unspecified matches any). false when the id is not known (or of another kind).
        # native: publish it in the native table after (flowctl.v1's heartbeats).
        def heartbeat(id, status, metrics, kind: nil, reported_at: nil, native: false)
          t = now
          @lock.synchronize do
            entry = @entries[id]
            return false if entry.nil? || (kind && entry.kind != kind && entry.kind != :unspecified)
            return holding(entry, metrics) { heartbeat_locked(entry, t, status, metrics, reported_at) } if entry.native

            bytes_before = @bytes
            heartbeat_locked(entry, t, status, metrics, reported_at).tap do
              if @beats && native then publish(entry)
              elsif @beats && @bytes != bytes_before then sync_limits
              end
            end
          end
        end

        # heartbeat's change, under the lock.
        def heartbeat_locked(entry, t, status, metrics, reported_at)
          id = entry.id
          merge_metrics(entry, metrics) unless metrics.empty?
          changed = status && status != entry.status
          entry.status = status if changed
          entry.reported_at = reported_at if reported_at
          t = entry.last_heartbeat if entry.native && entry.last_heartbeat > t # a native one came after t
          entry.last_heartbeat = t
          entry.heartbeats += 1
          if @persist_refresh && (changed || t - entry.saved_at >= @persist_refresh)
            entry.saved_at = t
            touch(id, :beat)
          else
            @version += 1
          end
          true
        end
        private :heartbeat_locked

        # Forgets a component; true when it was known.
        def unregister(id)
          @lock.synchronize do
            changing(id) do
              old = @entries.delete(id) or return false
              @bytes -= old_bytes(old) + metric_bytes(old.metrics)
              touch(id, :gone)
              true
            end
          end
        end

        # The janitor's rule (upstream's): a HEALTHY component whose last heartbeat is older than
        # the TTL becomes UNHEALTHY; nothing else changes, nothing is removed. Returns the ids.
        def sweep
          limit = now - (@ttl * 1e9).to_i
          @lock.synchronize do
            @entries.each_value.filter_map do |e|
              next unless e.status == HEALTHY && e.last_heartbeat < limit

              changing(e.id) do # folds in what the native table took in for it
                next unless e.last_heartbeat < limit # a native heartbeat came meanwhile

                e.status = UNHEALTHY
                touch(e.id, :beat)
                e.id
              end
            end
          end
        end

        def size = @lock.synchronize { @entries.size }
        def bytes = @lock.synchronize { fold_all || @bytes }

        # A snapshot of one component, or nil.
        def get(id)
          t = now
          @lock.synchronize do
            fold_one(id)
            @entries[id]&.snapshot(@ttl, t)
          end
        end

        # Snapshots of the components the block selects (all without a block), in
        # registration order. The block sees the Entry, under the lock: it must be quick.
        def select
          t = now
          @lock.synchronize do
            fold_all
            @entries.each_value.filter_map { |e| e.snapshot(@ttl, t) if !block_given? || yield(e) }
          end
        end

        # Counts by status and by protocol ({"HEALTHY" => 10, ...}, {v1: 11, seed: 1}) and the first
        # `rows` components' snapshots, in one pass that allocates nothing per component: what the
        # display needs at 10,000 components. (Native heartbeats change neither count: only the
        # rows shown are folded.)
        def summary(rows)
          t = now
          @lock.synchronize do
            rows ? @entries.each_value.first(rows).each { |e| fold_one(e.id) } : fold_all
            by_status = Hash.new(0)
            by_protocol = Hash.new(0)
            @entries.each_value do |e|
              by_status[e.status] += 1
              by_protocol[e.protocol] += 1
            end
            [by_status, by_protocol, @entries.each_value.first(rows || @entries.size).map { |e| e.snapshot(@ttl, t) }]
          end
        end

        # Persistence: up to max of the changes since they were last taken, as
        # [[id, :full | :beat | :gone, row or nil], ...], each row built under the lock (consistent).
        def take_dirty(max = nil)
          @lock.synchronize do
            n = max ? [max, @dirty.size].min : @dirty.size
            Array.new(n) do
              id, what = @dirty.shift
              fold_one(id)
              e = @entries[id]
              if e.nil? then [id, :gone, nil]
              else [id, what, what == :full ? e.to_row : e.beat_row]
              end
            end
          end
        end

        def dirty_count = @lock.synchronize { @dirty.size }

        # Persistence: changes that could not be written are taken again next time.
        def requeue(changes)
          @lock.synchronize do
            changes.each { |id, what, _row| @dirty[id] = @dirty[id] == :full ? :full : (@dirty[id] || what) }
          end
        end

        # Persistence: puts loaded entries back (a restart); counts them against the limits.
        def restore(entries)
          @lock.synchronize do
            entries.each do |e|
              @entries[e.id] = e
              @bytes += old_bytes(e) + metric_bytes(e.metrics)
            end
            sync_limits if @beats
            @version += 1
          end
        end

        # Changes not yet taken by persistence.
        def dirty? = @lock.synchronize { !@dirty.empty? }

        # The bytes of strings a registration holds.
        # Each String in a list or map also counts the Ruby object that holds it (OBJECT), so that
        # 60,000 one-byte event types cost what they occupy.
        def self.registration_bytes(id, fields)
          n = id.bytesize + fields[:endpoint].to_s.bytesize
          %i[name description version info_id].each { |f| n += fields[f].to_s.bytesize }
          %i[input_event_types output_event_types].each { |f| fields[f]&.each { |s| n += s.bytesize + OBJECT } }
          fields[:metadata]&.each { |k, v| n += k.bytesize + v.bytesize + 2 * OBJECT }
          n
        end

        private

        # Runs the block (under the lock) with id's entry out of the native table and what the
        # table took in for it folded in; publishes the entry there after (whatever happened) if
        # it was published before or publish is true, with the limits as they are then. Without
        # a table, only the block.
        def changing(id, publish: false)
          return yield unless @beats

          was = @entries[id]&.native
          change = was && @beats.take(id)
          fold(id, change) if change
          begin
            yield
          ensure
            e = @entries[id]
            e && (was || publish) ? publish(e) : sync_limits
          end
        end

        # A heartbeat through Ruby, under the lock: the table holds off that component's heartbeats
        # while the block changes the entry, then learns the status and the metrics merged (not
        # the whole map again: this is the seed's every heartbeat).
        def holding(entry, metrics)
          return yield unless @beats

          change = @beats.hold(entry.id)
          fold(entry.id, change) if change
          merged = nil
          begin
            result = yield
            merged = metrics
            result
          ensure
            @beats.release(entry.id, @beat_codes.fetch(entry.status, -1), entry.saved_at || 0, merged,
                           @limits.max_bytes - @bytes)
          end
        end

        def publish(e)
          @beats.put(e.id, @beat_codes.fetch(e.status, -1), e.saved_at || 0, e.metrics, @limits.max_bytes - @bytes)
          e.native = true
        end

        def sync_limits = @beats.limits(@limits.max_bytes - @bytes, @persist_refresh || 0)

        # What the native table took in for one entry, as #heartbeat would have changed it.
        def fold(id, (metrics, last, beats, growth))
          e = @entries[id] or return
          current = e.metrics
          metrics.each { |k, v| current[k] = v unless current[k] == v }
          e.last_heartbeat = last if last > e.last_heartbeat
          e.heartbeats += beats
          @bytes += growth
        end

        # nil, always (bytes reads @bytes after it).
        def fold_all
          @beats&.drain&.each { |id, *change| fold(id, change) }
          nil
        end

        def fold_one(id)
          change = @entries[id]&.native && @beats.drain(id)
          fold(id, change) if change
        end

        def touch(id, what)
          @version += 1
          return unless @persist_refresh

          @dirty[id] = @dirty[id] == :full && what == :beat ? :full : what
        end

        def check_registration_size(size)
          return if size <= @limits.max_registration_bytes

          raise Flowctl::InvalidArgument, "registration too large: #{size} bytes of ids, names, event types, " \
                                          "endpoint and metadata (limit #{@limits.max_registration_bytes})"
        end

        def check_room(growth, old)
          if old.nil? && @entries.size >= @limits.max_components
            raise Flowctl::ResourceExhausted, "control plane full: #{@entries.size} components registered " \
                                              "(limit #{@limits.max_components}); unregister some first"
          end
          return if growth <= 0 || @bytes + growth <= @limits.max_bytes

          raise Flowctl::ResourceExhausted, "control plane full: #{@bytes} bytes held (limit #{@limits.max_bytes})"
        end

        def old_bytes(entry) = Store.registration_bytes(entry.id, entry_fields(entry))

        def entry_fields(e)
          { endpoint: e.endpoint, name: e.name, description: e.description, version: e.version, info_id: e.info_id,
            input_event_types: e.input_event_types, output_event_types: e.output_event_types, metadata: e.metadata }
        end

        def metric_bytes(metrics)
          metrics.sum { |k, v| k.bytesize + (v.is_a?(String) ? v.bytesize : 8) + 2 * OBJECT }
        end

        # Checks every new metric against the limits before changing anything.
        def merge_metrics(entry, metrics)
          current = entry.metrics
          added = 0
          growth = 0
          metrics.each do |k, v|
            vsize = v.is_a?(String) ? v.bytesize : 8
            if k.bytesize + vsize > @limits.max_metric_bytes
              raise Flowctl::InvalidArgument, "metric #{k[0, 64].inspect} too large: #{k.bytesize + vsize} bytes " \
                                              "(limit #{@limits.max_metric_bytes})"
            end
            old = current[k]
            if old.nil?
              added += 1
              growth += k.bytesize + vsize + 2 * OBJECT
            else
              growth += vsize - (old.is_a?(String) ? old.bytesize : 8)
            end
          end
          if current.size + added > @limits.max_metrics
            raise Flowctl::ResourceExhausted, "too many metrics for #{entry.id}: #{current.size + added} keys " \
                                              "(limit #{@limits.max_metrics}; keys are never removed)"
          end
          if growth.positive? && @bytes + growth > @limits.max_bytes
            raise Flowctl::ResourceExhausted, "control plane full: #{@bytes} bytes held (limit #{@limits.max_bytes})"
          end

          @bytes += growth
          # an unchanged value keeps the object already stored: fewer short-lived objects reach
          # the old generation (10,000 components' metrics are mostly old objects)
          metrics.each { |k, v| current[k] = v unless current[k] == v }
        end
      end
    end
  end
end
