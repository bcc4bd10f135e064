# frozen_string_literal: true

require "json"

module Flowctl
  module ControlPlane
    class Registry
      # The control plane's state in an SQLite file (Registry.new(db: path)), so a restarted
      # control plane knows every component it knew, with its last status. Needs the sqlite3
      # gem (Debian: ruby-sqlite3), loaded only when a db is used.
      #
      # Writes are transactions, so a control plane killed at any moment (SIGKILL included)
      # restarts with the registry as of its last commit. What is acknowledged when:
      # - registrations and unregistrations are committed before their reply is sent (group
      #   commit: the calls that arrive while one transaction is written share the next one);
      # - a heartbeat that changes the status, and the janitor's changes, are written within
      #   flush_interval seconds (default 1), all together in one transaction;
      # - a heartbeat that changes only metrics and the time is written once the stored one is
      #   older than refresh_interval (Registry: ttl / 3). At 10,000 components beating every
      #   second that is ~1,000 small row updates a second instead of 10,000, and no disk write
      #   on the hot path, for state that each component's next heartbeat restores anyway;
      # So a crash loses at most flush_interval of status changes and refresh_interval of
      # metrics and heartbeat times, never a registration that was answered.
      # - journal_mode=WAL with synchronous=NORMAL (the default): a commit survives the process
      #   being killed; a power loss may lose the last commits (synchronous: "FULL" keeps them).
      #
      # Schema (PRAGMA user_version counts the MIGRATIONS applied). One row per service id;
      # strings that may hold anything are BLOBs or JSON (NUL, NaN/Infinity metrics round-trip).
      # Tables for pipeline runs and configuration versions come as later MIGRATIONS (append,
      # never edit an applied one) and write through #transaction.
      class Persistence
        MIGRATIONS = [
          <<~SQL
            CREATE TABLE components (
              service_id BLOB PRIMARY KEY NOT NULL, -- UTF-8 bytes, as a BLOB so that NUL is kept
              kind TEXT NOT NULL,                   -- source, processor, consumer, unspecified
              protocol TEXT NOT NULL,               -- v1 or seed
              registration TEXT NOT NULL,           -- JSON: what a registration sets (Entry#to_row)
              status BLOB NOT NULL,                 -- "HEALTHY", ... (a seed status is free text)
              metrics TEXT NOT NULL,                -- JSON object
              last_heartbeat INTEGER NOT NULL,      -- unix nanoseconds
              heartbeats INTEGER NOT NULL,
              reported_at INTEGER,                  -- unix nanoseconds, the component's clock (seed)
              updated_at REAL NOT NULL              -- unix seconds of the write
            );
          SQL
        ].freeze

        INSTALL = "the sqlite3 gem is needed for Registry.new(db:): apt-get install ruby-sqlite3 " \
                  "(Debian), or gem install sqlite3"

        attr_reader :path, :flush_interval

        def self.load_sqlite
          require "sqlite3"
        rescue LoadError => e
          raise Flowctl::Error, "#{INSTALL} (#{e.message})"
        end

        def initialize(path, flush_interval: 1.0, synchronous: "NORMAL")
          Persistence.load_sqlite
          unless %w[OFF NORMAL FULL].include?(synchronous.to_s.upcase)
            raise ArgumentError, "synchronous must be OFF, NORMAL or FULL (given #{synchronous.inspect})"
          end

          @path = path.to_s
          @flush_interval = flush_interval
          @lock = Mutex.new    # the connection: one user at a time
          @commit = Mutex.new  # group commit bookkeeping
          @committed = ConditionVariable.new
          @wanted = @done = 0
          @error = nil
          @failed = -1 # the last generation whose flush failed
          @pid = Process.pid
          @db = open_db(synchronous.to_s.upcase)
        end

        # The Entries stored, in registration order.
        def load
          rows = @lock.synchronize do
            @db.execute("SELECT service_id, registration, status, metrics, last_heartbeat, heartbeats, reported_at " \
                        "FROM components")
          end
          rows.map do |id, registration, status, metrics, last, beats, reported|
            h = JSON.parse(registration, allow_nan: true)
            h.merge!("status" => status.to_s.dup.force_encoding(Encoding::UTF_8), "metrics" => JSON.parse(metrics, allow_nan: true),
                     "last_heartbeat" => last, "heartbeats" => beats, "reported_at" => reported)
            Entry.from_row(h)
          rescue JSON::ParserError, TypeError, ArgumentError, NoMethodError => e
            raise Flowctl::Error, "#{@path}: unreadable component #{id.to_s.dup.force_encoding('UTF-8').inspect}: #{e.message}"
          end.sort_by(&:registered_at)
        end

        # Starts the writer thread on store's changes.
        def attach(store)
          @store = store
          @ticker = Ticker.new("flowctl-persist", @flush_interval, finally: -> { close_db }) { flush }
          self
        end

        # From a finalizer: a last flush on the writer thread, which then closes the file.
        def close_later = @ticker&.stop_later

        # Waits until every change made before the call is committed (registrations call it
        # before they reply). Raises Flowctl::Unavailable when the write failed.
        # After #close it raises Flowctl::Unavailable at once.
        def commit
          if @pid != Process.pid # a forked child: the writer thread stayed in the parent
            raise Flowctl::Unavailable, "control plane storage belongs to process #{@pid}: open the db again after fork"
          end

          mine = @commit.synchronize { @wanted += 1 }
          @ticker.wake
          @commit.synchronize do
            @committed.wait(@commit) while @done < mine && @failed < mine && !@closed
            return nil if @done >= mine
            raise Flowctl::Unavailable, "control plane storage failed: #{@error.message}" if @failed >= mine

            raise Flowctl::Unavailable, "control plane closed: #{@path} is no longer written"
          end
        end

        # Writes what changed since the last flush in one transaction (the writer thread), in
        # chunks of CHUNK rows taken from the store between which other threads run: the store's
        # lock and the GVL (the sqlite3 gem keeps it while SQLite works) are never held for long.
        def flush
          gen = @commit.synchronize { @wanted }
          taken = []
          write(@store.dirty_count, taken)
          @commit.synchronize do
            @done = gen
            @committed.broadcast
          end
        rescue StandardError => e
          @store.requeue(taken)
          warn "flowctl control plane: cannot write #{@path}: #{e.class}: #{e.message}"
          @commit.synchronize do
            @error = e
            @failed = gen # the calls waiting for this flush fail; later ones wait for the next
            @committed.broadcast
          end
        end

        # Runs the block in a transaction on the connection (later tables write through this).
        # Returns the block's value; an exception rolls the transaction back and is raised.
        def transaction(&block)
          @lock.synchronize do
            result = nil
            @db.transaction(:immediate) { result = block.call(@db) }
            result
          end
        end

        # A last flush, then closes the file; idempotent.
        def close
          @ticker&.stop # its last run writes what is pending
          @commit.synchronize do
            @closed = true
            @committed.broadcast
          end
          close_db
        end

        private

        def close_db
          @lock.synchronize do
            unless @db.closed?
              @statements.each_value(&:close)
              @db.close
            end
          end
          nil
        end

        def open_db(synchronous)
          db = SQLite3::Database.new(@path)
          db.busy_timeout = 5000
          db.execute("PRAGMA journal_mode=WAL")
          db.execute("PRAGMA synchronous=#{synchronous}")
          migrate(db)
          @statements = prepare(db)
          db
        rescue SQLite3::Exception => e
          db&.close
          raise Flowctl::Error, "#{@path}: cannot open the control plane database: #{e.message}"
        end

        # The writes of #flush, prepared once.
        def prepare(db)
          {
            full: db.prepare("INSERT OR REPLACE INTO components (service_id, kind, protocol, registration, status, " \
                             "metrics, last_heartbeat, heartbeats, reported_at, updated_at) " \
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
            beat: db.prepare("UPDATE components SET status = ?, metrics = ?, last_heartbeat = ?, heartbeats = ?, " \
                             "reported_at = ?, updated_at = ? WHERE service_id = ?"),
            gone: db.prepare("DELETE FROM components WHERE service_id = ?")
          }
        end

        def migrate(db)
          have = db.get_first_value("PRAGMA user_version").to_i
          if have > MIGRATIONS.size
            raise Flowctl::Error, "#{@path}: schema version #{have} is newer than this flowctl knows (#{MIGRATIONS.size})"
          end

          MIGRATIONS.each_with_index.drop(have).each do |sql, i|
            db.transaction(:immediate) do
              db.execute_batch(sql)
              db.execute("PRAGMA user_version = #{i + 1}")
            end
          end
        end

        CHUNK = 256

        def write(count, taken)
          return if count.zero?

          t = Process.clock_gettime(Process::CLOCK_REALTIME)
          @lock.synchronize do
            @db.transaction(:immediate) do
              while taken.size < count
                chunk = @store.take_dirty([CHUNK, count - taken.size].min)
                break if chunk.empty?

                taken.concat(chunk)
                chunk.each { |id, what, row| write_row(@statements[what], id, what, row, t) }
                Thread.pass
              end
            end
          end
        end

        def write_row(stmt, id, what, row, time)
          key = SQLite3::Blob.new(id.b)
          case what
          when :gone then stmt.execute(key)
          when :beat
            stmt.execute(SQLite3::Blob.new(row["status"].b), JSON.generate(row["metrics"], allow_nan: true),
                         row["last_heartbeat"], row["heartbeats"], row["reported_at"], time, key)
          else
            beat = row.slice(*Entry::BEAT_FIELDS)
            stmt.execute(key, row["kind"], row["protocol"], JSON.generate(row.except(*Entry::BEAT_FIELDS)),
                         SQLite3::Blob.new(beat["status"].b), JSON.generate(beat["metrics"], allow_nan: true),
                         beat["last_heartbeat"], beat["heartbeats"], beat["reported_at"], time)
          end
        end
      end
    end
  end
end
